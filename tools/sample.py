r"""Samples completions from a model (checkpoint dir, HF dir, .gguf, smollm2).

Usage:
  python tools/sample.py --model=smollm2 \
      --prompt="What is the capital of France?" --temperature=0
  python tools/sample.py --model=DIR --prompt="Name a country bordering Peru." \
      --mode=multi_rlcr --num_answers=3 --num_samples=4 --temperature=0.7
  python tools/sample.py --model=DIR --prompt_ids=1,2,3 --json
  # prompt, format and sampling settings of a training config:
  python tools/sample.py --model=WORKDIR --config=configs/demo.py \
      --prompt="Name a country bordering Peru." [--config.sampler.top_p=0.9]

--config: an experiment config (``--config.x=y`` overrides): its reward
format (mode, K, require_think), task family (data.family) and sampler
settings (max_new_tokens, temperature, top_p, top_k, cache_dtype) are
used, so prompts and completions are those of the run; --mode,
--num_answers, --family, --max_new_tokens, --temperature, --top_p and
--top_k must not be given with it. --model defaults to the config's
model.path.
--prompt is rendered with the tokenizer's chat template (with the mode's
system prompt when --mode is given) unless --raw. --json prints one object
per completion: prompt, completion, token_ids, logprobs (+ answers and
confidences with --mode).
"""

import dataclasses
import json
import os
import sys

# Config files import `configs.base`: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from multians_jax import config, sharding, sources
from multians_jax.data import prompts
from multians_jax.model import sampler  # noqa: E402
from multians_jax.rl import parsing, reward

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config: prompt and sample as that run does."
)

_MODEL = flags.DEFINE_string("model", "smollm2", "Model path or 'smollm2'.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Prompt text (repeatable).")
_IDS = flags.DEFINE_multi_string("prompt_ids", [], "Comma-separated ids.")
_RAW = flags.DEFINE_bool("raw", False, "Do not apply the chat template.")
_N = flags.DEFINE_integer("num_samples", 1, "Completions per prompt.")
_MAX = flags.DEFINE_integer("max_new_tokens", 128, "Tokens per completion.")
_TEMP = flags.DEFINE_float("temperature", 0.7, "0 = greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1 = off).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k (0 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_JSON = flags.DEFINE_bool("json", False, "One JSON object per completion.")
_MODE = flags.DEFINE_enum("mode", None, list(prompts.MODES), "Answer format.")
_K = flags.DEFINE_integer("num_answers", 3, "K answers per completion.")
_FAMILY = flags.DEFINE_enum(
  "family", "qa", list(prompts.TASK_FAMILIES), "Task."
)

_FROM_CONFIG = (  # flags whose values come from --config when it is given
  "mode num_answers family max_new_tokens temperature top_p top_k"
).split()


@dataclasses.dataclass(frozen=True)
class Settings:
  model: str
  rcfg: reward.RewardConfig | None  # None: no answer format
  family: str
  sampling: sampler.SamplingConfig  # stop and pad ids come from the model


def settings() -> Settings:
  if _CONFIG.value is None:
    rcfg = None
    if _MODE.value:
      rcfg = reward.RewardConfig(
        mode=_MODE.value, num_answers=_K.value, require_think=False
      )
    return Settings(
      _MODEL.value,
      rcfg,
      _FAMILY.value,
      sampler.SamplingConfig(
        max_new_tokens=_MAX.value,
        temperature=_TEMP.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
      ),
    )
  given = [f"--{n}" for n in _FROM_CONFIG if flags.FLAGS[n].present]
  run = config.from_tool_config(_CONFIG.value, given)
  model = _MODEL.value if flags.FLAGS["model"].present else run.model.path
  return Settings(model, run.reward, run.data.family, run.sampling)


def encode(tok, st: Settings):
  rows, shown = [], []
  for text in _PROMPT.value:
    if tok is None:
      raise app.UsageError("this model has no tokenizer: use --prompt_ids")
    if not _RAW.value:
      msgs = (
        prompts.build_messages(
          text, st.rcfg.mode, st.family, st.rcfg.num_answers
        )
        if st.rcfg is not None
        else [{"role": "user", "content": text}]
      )
      text = tok.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False
      )
    rows.append(tok(text, add_special_tokens=False)["input_ids"])
    shown.append(text)
  for ids in _IDS.value:
    rows.append([int(x) for x in ids.split(",")])
    shown.append(ids)
  if not rows:
    raise app.UsageError("give --prompt or --prompt_ids")
  t = max(map(len, rows))
  tokens = np.zeros((len(rows), t), np.int32)
  mask = np.zeros((len(rows), t), bool)
  for i, r in enumerate(rows):
    tokens[i, t - len(r) :], mask[i, t - len(r) :] = r, True
  return tokens, mask, shown


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    st = settings()
  except ValueError as e:
    sys.exit(f"sample: {e}")
  mesh = sharding.make_mesh()
  model, cfg, tok = sources.load_model(st.model, mesh, sharding.TRAIN_RULES)
  tokens, mask, shown = encode(tok, st)
  stop_ids, pad_id = config.stop_and_pad(cfg, tok)
  scfg = dataclasses.replace(st.sampling, stop_ids=stop_ids, pad_id=pad_id)
  r = sampler.sample(
    model,
    tokens,
    mask,
    jax.random.key(_SEED.value),
    scfg,
    num_samples=_N.value,
    mesh=mesh,
  )
  toks, lps = np.asarray(r.tokens), np.asarray(r.logprobs)
  rcfg = st.rcfg
  for b, n in enumerate(np.asarray(r.lengths)):
    out = {
      "prompt": shown[b // _N.value],
      "token_ids": toks[b, :n].tolist(),
      "logprobs": [round(float(x), 5) for x in lps[b, :n]],
    }
    if tok is not None:
      out["completion"] = tok.decode(toks[b, :n], skip_special_tokens=True)
    if rcfg is not None:
      parsed = parsing.parse(out.get("completion", ""), rcfg)
      out.update(
        answers=list(parsed.answers),
        confidences=list(parsed.confidences),
        format_ok=parsed.format_ok,
      )
    if _JSON.value:
      print(json.dumps(out, ensure_ascii=False))
    else:
      print(f"--- [{b // _N.value}.{b % _N.value}] {n} tokens")
      print(out.get("completion", out["token_ids"]))
      if rcfg is not None:
        print(
          f"answers={out['answers']} confidences={out['confidences']} "
          f"format_ok={out['format_ok']}"
        )


if __name__ == "__main__":
  app.run(main)
