"""Measures the learning tests' figures over seeds, to set their thresholds.

  python tests/measure_margins.py lab --seeds=0,1,2,3,4 --out=margins.jsonl
  python tests/measure_margins.py lab_rlcr --seeds=0,1,2,3,4 --out=m.jsonl
  python tests/measure_margins.py toy --seeds=0,1,2,3,4 --steps=32 --out=m.jsonl
  python tests/measure_margins.py plain|lora --seeds=43,0,1 --out=m.jsonl

lab: the lab's learning test (both arms; --steps / --lr set the RL steps
and learning rate); lab_rlcr: its Multi-RLCR check; toy: the toy task's
plain, answer-credit and LoRA runs; plain: the plain run alone; lora: the
LoRA run alone.

Runs each learning test's training exactly as the test does (same
environment as tests/conftest.py: 8 host devices, highest matmul
precision), once per seed, and appends one JSON line per (test, seed) with
the figures the test asserts on. A (test, seed) already in --out is
skipped, so an interrupted sweep resumes. Prints, per figure, the mean,
the seed-to-seed standard deviation, the minimum and maximum: the numbers
the comments beside the thresholds quote. Not collected by pytest.
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import conftest  # noqa: E402,F401  (devices, precision, offline HF)


def _lab(seed, tmp, steps=None, lr=None):
  import test_lab

  kw = dict(seed=seed, steps=steps, lr=lr)
  (mw, ma) = test_lab._train_arm("multi_rlvr", f"{tmp}/m", **kw)
  (sw, sa) = test_lab._train_arm("rlvr", f"{tmp}/s", **kw)
  return {
    "multi_warm_unique30": mw["unique@30"],
    "multi_coverage_rise": ma["dist/coverage"] - mw["dist/coverage"],
    "multi_coverage_over_oracle": ma["dist/coverage"]
    / ma["dist/oracle_coverage"],
    "multi_unique30": ma["unique@30"],
    "single_warm_unique30": sw["unique@30"],
    "single_unique30": sa["unique@30"],
    "single_top1_rise": sa["dist/top1_p"] - sw["dist/top1_p"],
    "multi_minus_single_coverage": ma["dist/coverage"] - sa["dist/coverage"],
  }


def _lab_rlcr(seed, tmp, steps=None, lr=None):
  import test_lab

  kw = dict(seed=seed, steps=steps or test_lab.RLCR_STEPS, lr=lr)
  (w, a) = test_lab._train_arm("multi_rlcr", f"{tmp}/r", **kw)
  return {
    "rlcr_warm_unique30": w["unique@30"],
    "rlcr_warm_conf_err": w["dist/conf_abs_err"],
    "rlcr_coverage_rise": a["dist/coverage"] - w["dist/coverage"],
    "rlcr_coverage_over_oracle": a["dist/coverage"] / a["dist/oracle_coverage"],
    "rlcr_conf_err": a["dist/conf_abs_err"],
    "rlcr_conf_err_drop": w["dist/conf_abs_err"] - a["dist/conf_abs_err"],
  }


def _rise(rewards, n=4):
  import numpy as np

  return float(np.mean(rewards[-n:]) - np.mean(rewards[:n]))


def _toy(seed, tmp, steps=None, lr=None):
  import pathlib

  import test_loop
  import test_lora

  tmp = pathlib.Path(tmp)
  steps = steps or test_loop.TOY_STEPS
  out = {}
  rows = test_loop._toy_run(tmp / "plain", steps, seed=seed)
  out["toy_rise"] = _rise([r["reward/total"] for r in rows])
  out["toy_curve"] = [r["reward/total"] for r in rows]
  rows = test_loop._toy_run(tmp / "credit", steps, credit="answer", seed=seed)
  out["answer_credit_rise"] = _rise([r["reward/total"] for r in rows])
  out["answer_credit_curve"] = [r["reward/total"] for r in rows]
  out["answer_credit_slot_frac"] = max(
    r["credit/slot_token_frac"] for r in rows
  )
  (tmp / "lora").mkdir()
  lora = test_lora._toy_lora(tmp / "lora", steps=steps, seed=seed)
  out["lora_rise"], out["lora_curve"] = _rise(lora), lora
  return out


def _plain(seed, tmp, steps=None, lr=None):
  import pathlib

  import test_loop

  steps = steps or test_loop.TOY_STEPS
  rows = test_loop._toy_run(
    pathlib.Path(tmp) / "plain", steps, seed=seed, lr=lr
  )
  rewards = [r["reward/total"] for r in rows]
  return {"toy_rise": _rise(rewards), "toy_curve": rewards}


def _lora(seed, tmp, steps=None, lr=None):
  import pathlib

  import test_lora

  rewards = test_lora._toy_lora(
    pathlib.Path(tmp), steps=steps or 16, seed=seed, lr=lr
  )
  return {"lora_rise": _rise(rewards), "lora_curve": rewards}


def main():
  import tempfile

  import numpy as np

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("which", choices=("lab", "lab_rlcr", "toy", "plain", "lora"))
  p.add_argument("--seeds", default="0,1,2,3,4")
  p.add_argument("--out", required=True)
  p.add_argument("--steps", type=int, default=None, help="RL steps")
  p.add_argument("--lr", type=float, default=None, help="lab: RL lr")
  a = p.parse_args()
  seeds = [int(s) for s in a.seeds.split(",")]
  done = []
  if os.path.exists(a.out):
    with open(a.out) as f:
      done = [json.loads(line) for line in f if line.strip()]
  fn = {
    "lab": _lab,
    "lab_rlcr": _lab_rlcr,
    "toy": _toy,
    "plain": _plain,
    "lora": _lora,
  }[a.which]
  setting = {"steps": a.steps, "lr": a.lr} if a.which not in ("toy",) else (
    {"steps": a.steps} if a.steps else {})  # fmt: skip
  done = [r for r in done if r.get("setting", {}) == setting]
  for seed in seeds:
    if any(r["which"] == a.which and r["seed"] == seed for r in done):
      continue
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
      figs = fn(seed, tmp, a.steps, a.lr)
    row = {"which": a.which, "seed": seed, "seconds": time.time() - t0}
    row["setting"] = setting
    row.update(figs)
    print(json.dumps(row), flush=True)
    with open(a.out, "a") as f:
      f.write(json.dumps(row) + "\n")
    done.append(row)
  rows = [r for r in done if r["which"] == a.which]
  keys = [k for k in rows[0] if k not in ("which", "seed", "seconds",
          "setting") and not k.endswith("_curve")]  # fmt: skip
  for k in keys:
    v = np.array([r[k] for r in rows])
    print(
      f"{k:30s} n={len(v)} mean={v.mean():.4f} sd={v.std(ddof=1):.4f} "
      f"min={v.min():.4f} max={v.max():.4f}"
    )


if __name__ == "__main__":
  main()
