r"""One report from several runs' held-out evaluations.

Usage:
  python tools/compare.py --runs=rlvr_s0=runs/lab/rlvr_s0,rlvr_s1=... \
      --out=runs/lab/compare [--tag=after]

Each DIR is a training WORKDIR (its eval/<tag>.json, default the final
held-out evaluation ``after``) or an output directory of
tools/evaluate.py (eval.json). Names that differ only by a trailing seed tag
(``_s0``, ``_seed1``) form one group, shown as mean and min–max.
Writes OUT/compare.md, OUT/compare.json and PNGs: recall@k curves,
unique-answer histograms, reliability diagrams, tokens per distinct
correct answer.
"""

import os
import sys

from absl import app, flags

from multians_jax.report import compare

_RUNS = flags.DEFINE_string("runs", None, "NAME=DIR,NAME=DIR,...")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_TAG = flags.DEFINE_string("tag", "after", "Evaluation tag of a WORKDIR.")
flags.mark_flags_as_required(["runs", "out"])


def main(argv):
  del argv
  try:
    runs = compare.write_comparison(
      compare.parse_runs(_RUNS.value), _OUT.value, _TAG.value
    )
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"compare: {e}")
  print(compare.runs_table(runs))
  print(f"wrote {os.path.join(_OUT.value, 'compare.md')}")


if __name__ == "__main__":
  app.run(main)
