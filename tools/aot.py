r"""Compile one RL step for a TPU slice or GPU host on this (CPU) host: does
it fit?

Usage:
  python tools/aot.py --config=configs/qwen3_8b_multi_rlcr.py:v5p \
      --topology=v5p:2x2x4 [--config.model.attention=splash] [--out=DIR]
  python tools/aot.py --config=configs/qwen3_8b_multi_rlcr.py:gpu8 \
      --topology=h100:8 --config.model.attention=cudnn
  python tools/aot.py --config=configs/tiny.py --topology=v5e:2x2 \
      --config.mesh.fsdp=-1 --stages=update

Builds compile-only devices for --topology (``jax.experimental.topologies``
with libtpu for TPU slices, the CUDA plugin for H100 hosts: ``pip install
-e ".[aot]"``; multians_jax/aot/target.py), the config's mesh over them, and
compiles every jitted stage of one RL step (prefill, decode, update, the
log-prob pass and the warm-up when the config uses them) with the config's
real shapes and shardings. Prints per stage and chip the compiler's memory,
the FLOPs and bytes accessed with loop trip counts, the roofline time on the
chip, and whether it fits (on GPUs: in the share of memory JAX
preallocates, XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by default); writes
DIR/aot.json. Exits 1 when a stage fails
to compile or does not fit the chip's HBM (the stage, the bytes and the
setting to change are printed). The library is multians_jax/aot/step.py.
"""

import json
import os
import sys

from multians_jax.aot import report as aot_report
from multians_jax.aot import step as aot
from multians_jax.aot import target as aot_target

aot_target.quiet_env()  # before jax initialises a backend

from absl import app, flags  # noqa: E402 (after quiet_env)
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.")
_TOPOLOGY = flags.DEFINE_string(
  "topology",
  None,
  "TPU topology (v5p:2x2x4, v5e:2x2, v6e:4x4) or GPU host(s) (h100:8, "
  "h100:2x8: hosts x GPUs per host).",
)
_OUT = flags.DEFINE_string("out", None, "Directory for aot.json.")
_STAGES = flags.DEFINE_list(
  "stages", None, "Compile only these stages (default: all the run uses)."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    res = aot.run_aot(
      _CONFIG.value,
      _TOPOLOGY.value,
      stages=_STAGES.value,
      progress=lambda m: print(m, file=sys.stderr, flush=True),
    )
  except (aot_target.AotError, ValueError) as e:
    print(f"aot: {e}", file=sys.stderr)
    return 1
  print(aot_report.format_table(res))
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    path = os.path.join(_OUT.value, "aot.json")
    with open(path, "w") as fh:
      json.dump(res, fh, indent=1)
    print(f"wrote {path}")
  return 0 if res["fits"] else 1


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main)
