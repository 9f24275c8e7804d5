r"""Evaluates a model on held-out questions: coverage, calibration, cost.

Usage:
  # score exactly as a training run does (its reward, evaluation settings,
  # data and seed), e.g. a run's checkpoint with the run's config:
  python tools/evaluate.py --model=WORKDIR --config=configs/lab.py:rlvr \
      --out=DIR [--config.eval.num_generations=10 ...]
  # the defaults (configs/base.py) with a few settings changed:
  python tools/evaluate.py --model=PATH --out=DIR \
      --config.reward.mode=multi_rlcr --config.eval.num_prompts=32 \
      [--baseline_samples=3]

--model: a training WORKDIR (its latest checkpoint), checkpoint dir, HF dir,
.gguf, Hub id or smollm2; default: the config's model.path. --config: an
experiment config, default configs/base.py, with ``--config.x=y``
overrides: the one place the settings come from. Its reward, eval
(num_prompts, num_generations, temperature), sampler (token limit, top-p,
top-k, cache dtype), data (name or jsonl, eval_split, data_dir; '' builds
TFDS data under ./data) and seed are used, so the figures equal a run's
own in-training evaluation (``eval/after.json``) for the same checkpoint
and config. Writes DIR/eval.json (read by tools/compare.py),
DIR/metrics.json, DIR/reliability.png and DIR/coverage_vs_k.png.
--baseline_samples=k also samples k independent single-answer (rlvr)
completions per question and reports their coverage@k, pass@k and token
cost next to the multi-answer model's.
"""

import dataclasses
import json
import os
import sys

from absl import app, flags, logging

from multians_jax import config, evaluate, sharding, sources
from multians_jax.data import pipeline as data
from multians_jax.report import plotting

_CONFIG = config.tool_config_flag("Experiment config: evaluate as it does.")
_MODEL = flags.DEFINE_string("model", None, "Model source (config's path).")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_BASE = flags.DEFINE_integer("baseline_samples", 0, "k single-answer samples.")
flags.mark_flags_as_required(["out"])


def records(run: config.RunConfig):
  """The evaluation split of the config's data, built on first use into
  ``data.data_dir`` ('' = ./data)."""
  return data.open_split(run.data, ".", run.data.eval_split)


def run_one(model, cfg, tok, recs, rcfg, ecfg, seed):
  stop_ids, pad_id = config.stop_and_pad(cfg, tok)
  return evaluate.run(
    model, tok, recs, rcfg, ecfg, seed=seed, stop_ids=stop_ids, pad_id=pad_id
  )


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    run = config.tool_run_config(_CONFIG)
  except ValueError as e:
    sys.exit(f"evaluate: {e}")
  name = _MODEL.value or run.model.path
  ecfg, rcfg, seed = run.eval_config, run.reward, run.eval_seed
  os.makedirs(_OUT.value, exist_ok=True)
  mesh = sharding.make_mesh()
  model, cfg, tok = sources.load_model(name, mesh, sharding.TRAIN_RULES)
  src = records(run)
  recs = [src[i] for i in range(min(ecfg.num_prompts, len(src)))]
  res = run_one(model, cfg, tok, recs, rcfg, ecfg, seed)
  g = ecfg.num_generations
  data_name = run.data.jsonl or run.data.name
  out = {"model": name, "data": data_name, "mode": rcfg.mode}
  out["metrics"] = res.summary
  evaluate.write_json(
    os.path.join(_OUT.value, "eval.json"),
    res,
    tag="evaluate",
    model=name,
    mode=rcfg.mode,
    num_answers=rcfg.num_answers,
    seed=seed,
    num_generations=g,
  )
  plotting.eval_figures(res, _OUT.value, g)
  if _BASE.value:
    base = run_one(
      model,
      cfg,
      tok,
      recs,
      dataclasses.replace(rcfg, mode="rlvr", num_answers=1),
      dataclasses.replace(ecfg, num_generations=_BASE.value),
      seed,
    )
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
  for who, summ in [("model", res.summary)] + (
    [("baseline", out["baseline"]["metrics"])] if _BASE.value else []
  ):
    cov = {k: round(v, 3) for k, v in summ.items() if k.startswith("coverage@")}
    print(who, cov, {k: round(summ[k], 3) for k in show if k in summ})


if __name__ == "__main__":
  app.run(main)
