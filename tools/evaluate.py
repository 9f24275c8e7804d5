r"""Evaluates a model on held-out questions: coverage, calibration, cost.

Usage:
  python tools/evaluate.py --model=PATH --data=countries --split=test \
      --out=DIR [--mode=multi_rlcr --num_answers=3] [--num_generations=4] \
      [--baseline_samples=3]

--model: checkpoint dir, HF dir, .gguf or smollm2. --data: a dataset name
(built into --data_dir on first use) or a .jsonl file in the project schema.
Writes DIR/metrics.json, DIR/reliability.png and DIR/coverage_vs_k.png.
--baseline_samples=k also samples k independent single-answer (rlvr)
completions per question and reports their coverage@k, pass@k and token
cost next to the multi-answer model's (token efficiency).
"""

import json
import os

from absl import app, flags, logging

from multians_jax import (
  checkpoint,
  datasets,
  evaluate,
  prompts,
  reward,
  sharding,
)
from multians_jax.datasets import schema

_MODEL = flags.DEFINE_string("model", "smollm2", "Model path or 'smollm2'.")
_DATA = flags.DEFINE_string("data", "countries", "Dataset name or .jsonl.")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate.")
_DATA_DIR = flags.DEFINE_string("data_dir", "data", "TFDS data dir.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_MODE = flags.DEFINE_enum("mode", "multi_rlcr", list(prompts.MODES), "Format.")
_K = flags.DEFINE_integer("num_answers", 3, "K answers per generation.")
_FAMILY = flags.DEFINE_enum("family", "qa", list(prompts.FAMILIES), "Task.")
_N = flags.DEFINE_integer("num_prompts", 64, "Questions to evaluate.")
_G = flags.DEFINE_integer("num_generations", 4, "Generations per question.")
_TEMP = flags.DEFINE_float("temperature", 0.7, "Sampling temperature.")
_MAX = flags.DEFINE_integer("max_new_tokens", 256, "Tokens per completion.")
_BASE = flags.DEFINE_integer("baseline_samples", 0, "k single-answer samples.")
_THINK = flags.DEFINE_bool("require_think", False, "Require a <think> block.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.mark_flags_as_required(["out"])


def records():
  if _DATA.value.endswith(".jsonl"):
    return schema.read_jsonl(_DATA.value, default_family=_FAMILY.value)
  datasets.build(_DATA.value.split("/")[0], _DATA_DIR.value)
  return datasets.load(_DATA.value, _SPLIT.value, _DATA_DIR.value)


def run_one(model, cfg, tok, recs, mode, k, g):
  rcfg = reward.RewardConfig(
    mode=mode, num_answers=k, require_think=_THINK.value
  )
  ecfg = evaluate.EvalConfig(
    num_prompts=_N.value,
    num_generations=g,
    temperature=_TEMP.value,
    max_new_tokens=_MAX.value,
    family=_FAMILY.value,
  )
  return evaluate.run(
    model,
    tok,
    recs,
    rcfg,
    ecfg,
    seed=_SEED.value,
    stop_ids=cfg.eos_ids or (tok.eos_token_id,),
    pad_id=cfg.pad_token_id or 0,
  )


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  os.makedirs(_OUT.value, exist_ok=True)
  mesh = sharding.make_mesh()
  model, cfg, tok = checkpoint.load_model(
    _MODEL.value, mesh, sharding.TRAIN_RULES
  )
  src = records()
  recs = [src[i] for i in range(min(_N.value, len(src)))]
  res = run_one(model, cfg, tok, recs, _MODE.value, _K.value, _G.value)
  out = {
    "model": _MODEL.value,
    "data": _DATA.value,
    "mode": _MODE.value,
    "metrics": res.summary,
  }
  evaluate.plots(res, _OUT.value, _G.value)
  if _BASE.value:
    base = run_one(model, cfg, tok, recs, "rlvr", 1, _BASE.value)
    out["baseline"] = {"samples": _BASE.value, "metrics": base.summary}
  with open(os.path.join(_OUT.value, "metrics.json"), "w") as f:
    json.dump(out, f, indent=2, default=float)
  show = (
    "format_valid_rate",
    "reward/num_correct",
    "set_brier",
    "ece",
    "completion_tokens",
    "tokens_per_distinct_correct",
  )
  for name, summ in [("model", res.summary)] + (
    [("baseline", out["baseline"]["metrics"])] if _BASE.value else []
  ):
    cov = {k: round(v, 3) for k, v in summ.items() if k.startswith("coverage@")}
    print(name, cov, {k: round(summ[k], 3) for k in show if k in summ})


if __name__ == "__main__":
  app.run(main)
