r"""Evaluates a model on held-out questions: coverage, calibration, cost.

Usage:
  # score exactly as a training run does (its reward, evaluation settings,
  # data and seed), e.g. a run's checkpoint with the run's config:
  python tools/evaluate.py --model=WORKDIR --config=configs/lab.py:rlvr \
      --out=DIR [--config.eval.num_generations=10 ...]
  # or with settings given one by one:
  python tools/evaluate.py --model=PATH --data=countries --split=test \
      --out=DIR [--mode=multi_rlcr --num_answers=3] [--num_generations=4] \
      [--baseline_samples=3]

--model: a training WORKDIR (its latest checkpoint), checkpoint dir, HF dir,
.gguf or smollm2. --config: an experiment config (with ``--config.x=y``
overrides); its reward, eval, data and seed settings are used, so the
figures equal the run's own in-training evaluation (``eval/after.json``)
for the same checkpoint, and the flags --data, --split, --mode,
--num_answers, --family, --num_prompts, --num_generations, --temperature,
--max_new_tokens, --require_think and --seed must not be given with it.
Without --config, the reward is ``reward.RewardConfig``'s defaults, the
training defaults of ``configs/base.py``, with the given mode.
--data: a dataset name (built into --data_dir on first use) or a .jsonl
file in the project schema. Writes DIR/eval.json (read by
tools/compare.py), DIR/metrics.json, DIR/reliability.png and
DIR/coverage_vs_k.png. --baseline_samples=k also samples k independent
single-answer (rlvr) completions per question and reports their
coverage@k, pass@k and token cost next to the multi-answer model's.
"""

import dataclasses
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from multians_jax import config, evaluate, sharding, sources
from multians_jax.data import datasets, prompts
from multians_jax.data import pipeline as data
from multians_jax.data.datasets import schema
from multians_jax.model import sampler
from multians_jax.rl import reward

# Config files import `configs.base`: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config: evaluate as that run does."
)

_MODEL = flags.DEFINE_string("model", "smollm2", "Model path or 'smollm2'.")
_DATA = flags.DEFINE_string("data", "countries", "Dataset name or .jsonl.")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate.")
_DATA_DIR = flags.DEFINE_string("data_dir", "data", "TFDS data dir.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_MODE = flags.DEFINE_enum("mode", "multi_rlcr", list(prompts.MODES), "Format.")
_K = flags.DEFINE_integer("num_answers", 3, "K answers per generation.")
_FAMILY = flags.DEFINE_enum(
  "family", "qa", list(prompts.TASK_FAMILIES), "Task."
)
_N = flags.DEFINE_integer("num_prompts", 64, "Questions to evaluate.")
_G = flags.DEFINE_integer("num_generations", 4, "Generations per question.")
_TEMP = flags.DEFINE_float("temperature", 0.7, "Sampling temperature.")
_MAX = flags.DEFINE_integer("max_new_tokens", 256, "Tokens per completion.")
_BASE = flags.DEFINE_integer("baseline_samples", 0, "k single-answer samples.")
_THINK = flags.DEFINE_bool("require_think", False, "Require a <think> block.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.mark_flags_as_required(["out"])

_FROM_CONFIG = (  # flags whose values come from --config when it is given
  "data split mode num_answers family num_prompts num_generations "
  "temperature max_new_tokens require_think seed"
).split()


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that decides the figures (from --config or the flags)."""

  reward: reward.RewardConfig
  eval: evaluate.EvalConfig
  data: str
  split: str
  seed: int
  data_config: config.DataConfig | None = None  # from --config
  family: str = "qa"  # of .jsonl records that name none


def settings() -> Settings:
  if _CONFIG.value is None:
    return Settings(
      reward=reward.RewardConfig(
        mode=_MODE.value, num_answers=_K.value, require_think=_THINK.value
      ),
      eval=evaluate.EvalConfig(
        num_prompts=_N.value,
        num_generations=_G.value,
        sampling=sampler.SamplingConfig(
          max_new_tokens=_MAX.value, temperature=_TEMP.value
        ),
      ),
      data=_DATA.value,
      split=_SPLIT.value,
      seed=_SEED.value,
      family=_FAMILY.value,
    )
  given = [f"--{n}" for n in _FROM_CONFIG if flags.FLAGS[n].present]
  run = config.from_tool_config(_CONFIG.value, given)
  dc = dataclasses.replace(
    run.data, data_dir=run.data.data_dir or os.path.abspath(_DATA_DIR.value)
  )
  return Settings(
    run.reward, run.eval_config, dc.name, dc.eval_split, run.eval_seed, dc
  )


def records(st: Settings):
  if st.data_config is not None:
    return data.open_split(st.data_config, ".", st.split)
  if st.data.endswith(".jsonl"):
    return schema.read_jsonl(st.data, default_family=st.family)
  datasets.build(st.data.split("/")[0], _DATA_DIR.value)
  return datasets.load(st.data, st.split, _DATA_DIR.value)


def run_one(model, cfg, tok, recs, rcfg, ecfg, seed):
  stop_ids, pad_id = config.stop_and_pad(cfg, tok)
  return evaluate.run(
    model, tok, recs, rcfg, ecfg, seed=seed, stop_ids=stop_ids, pad_id=pad_id
  )


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    st = settings()
  except ValueError as e:
    sys.exit(f"evaluate: {e}")
  os.makedirs(_OUT.value, exist_ok=True)
  mesh = sharding.make_mesh()
  model, cfg, tok = sources.load_model(_MODEL.value, mesh, sharding.TRAIN_RULES)
  src = records(st)
  recs = [src[i] for i in range(min(st.eval.num_prompts, len(src)))]
  res = run_one(model, cfg, tok, recs, st.reward, st.eval, st.seed)
  g = st.eval.num_generations
  out = {
    "model": _MODEL.value,
    "data": st.data,
    "mode": st.reward.mode,
    "metrics": res.summary,
  }
  evaluate.write_json(
    os.path.join(_OUT.value, "eval.json"),
    res,
    tag="evaluate",
    model=_MODEL.value,
    mode=st.reward.mode,
    num_answers=st.reward.num_answers,
    seed=st.seed,
    num_generations=g,
  )
  evaluate.plots(res, _OUT.value, g)
  if _BASE.value:
    base = run_one(
      model,
      cfg,
      tok,
      recs,
      dataclasses.replace(st.reward, mode="rlvr", num_answers=1),
      dataclasses.replace(st.eval, num_generations=_BASE.value),
      st.seed,
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
  for name, summ in [("model", res.summary)] + (
    [("baseline", out["baseline"]["metrics"])] if _BASE.value else []
  ):
    cov = {k: round(v, 3) for k, v in summ.items() if k.startswith("coverage@")}
    print(name, cov, {k: round(summ[k], 3) for k in show if k in summ})


if __name__ == "__main__":
  app.run(main)
