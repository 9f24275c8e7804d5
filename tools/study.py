r"""Runs a study (arms x seeds of one config file), resumably, then compares.

Usage:
  python tools/study.py --config=configs/lab.py \
      --arms=base,rlvr,rlcr,multi_rlvr,multi_rlcr --seeds=0,1 \
      --out=runs/lab [--parallel=2] [--override=steps=500 ...]

Each run is ``python -m multians_jax.main --config=CONFIG:ARM
--workdir=OUT/ARM_sSEED --config.seed=SEED`` (+ ``--config.KEY=VALUE`` per
--override), with one shared data dir OUT/data. A run whose WORKDIR holds
eval/after.json is done and skipped; an interrupted one resumes from its
latest checkpoint when the study is started again. Its output goes to
OUT/ARM_sSEED.log. At the end, OUT/compare/ holds the report of
tools/compare.py over every finished run in OUT (also those of earlier
invocations, e.g. more seeds for some arms). --export=DIR copies the small
outputs worth keeping in version control (each run's config.json,
metrics.jsonl and eval/*.json, and the compare report) into DIR.
"""

import glob
import os
import shutil
import subprocess
import sys
import time

from absl import app, flags

from multians_jax.report import compare

_CONFIG = flags.DEFINE_string("config", None, "Config file (takes ARM).")
_ARMS = flags.DEFINE_list("arms", None, "Config arguments, one run each.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds per arm.")
_OUT = flags.DEFINE_string("out", None, "Study directory.")
_PAR = flags.DEFINE_integer("parallel", 1, "Runs at a time.")
_OVR = flags.DEFINE_multi_string("override", [], "KEY=VALUE config overrides.")
_EXPORT = flags.DEFINE_string("export", "", "Copy the small outputs here.")
flags.mark_flags_as_required(["config", "arms", "out"])


def command(arm: str, seed: str, workdir: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "multians_jax.main",
    f"--config={_CONFIG.value}:{arm}",
    f"--workdir={workdir}",
    f"--config.seed={seed}",
    f"--config.data.data_dir={os.path.join(_OUT.value, 'data')}",
    *[f"--config.{o}" for o in _OVR.value],
  ]


def main(argv):
  del argv
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  runs = {f"{a}_s{s}": (a, s) for a in _ARMS.value for s in _SEEDS.value}
  todo = [
    n
    for n in runs
    if not os.path.exists(os.path.join(out, n, "eval/after.json"))
  ]
  print(f"{len(runs) - len(todo)} of {len(runs)} runs done; running {todo}")
  if todo:  # build the data set once, before runs share it
    first, rest = todo[0], todo[1:]
    _run_all([first], runs, out, 1)
    _run_all(rest, runs, out, _PAR.value)
  done = {  # every finished run in OUT, also those of earlier invocations
    os.path.basename(os.path.dirname(os.path.dirname(f))): os.path.dirname(
      os.path.dirname(f)
    )
    for f in sorted(glob.glob(os.path.join(out, "*", "eval", "after.json")))
  }
  if not done:
    return
  compare.write_comparison(done, os.path.join(out, "compare"))
  print(
    compare.runs_table(
      {n: compare.row(compare.load(p)) for n, p in done.items()}
    )
  )
  if _EXPORT.value:
    export(done, os.path.join(out, "compare"), _EXPORT.value)


def export(done: dict, report: str, dest: str) -> None:
  """Copies each run's small outputs and the report into ``dest``."""
  for n, path in done.items():
    files = [os.path.join(path, f) for f in ("config.json", "metrics.jsonl")]
    files = [f for f in files if os.path.exists(f)]
    files += glob.glob(os.path.join(path, "eval", "*.json"))
    for f in files:
      rel = os.path.relpath(f, path)
      os.makedirs(os.path.join(dest, n, os.path.dirname(rel)), exist_ok=True)
      shutil.copy2(f, os.path.join(dest, n, rel))
  shutil.copytree(report, os.path.join(dest, "compare"), dirs_exist_ok=True)
  print(f"exported {len(done)} runs and the report to {dest}")


def _run_all(names, runs, out, parallel):
  pending, active, failed = list(names), {}, []
  while pending or active:
    while pending and len(active) < parallel:
      n = pending.pop(0)
      log = open(os.path.join(out, f"{n}.log"), "w")  # noqa: SIM115
      cmd = command(*runs[n], os.path.join(out, n))
      active[n] = (
        subprocess.Popen(cmd, stdout=log, stderr=log),
        log,
        time.time(),
      )
      print(f"started {n}", flush=True)
    for n, (proc, log, t0) in list(active.items()):
      if proc.poll() is not None:
        log.close()
        del active[n]
        status = (
          "done" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
        )
        print(f"{n}: {status} in {time.time() - t0:.0f} s", flush=True)
        if proc.returncode:
          failed.append(n)
    time.sleep(1)
  if failed:
    print(f"failed runs (see their .log): {failed}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
