r"""Samples completions from any model source (checkpoint, WORKDIR, HF dir,
.gguf, Hub id, smollm2).

Usage:
  python tools/sample.py --model=smollm2 --nosystem_prompt \
      --prompt="What is the capital of France?" --config.sampler.temperature=0
  python tools/sample.py --model=DIR --prompt="Name a country bordering Peru." \
      --num_samples=4 --config.reward.mode=multi_rlcr
  python tools/sample.py --model=DIR --prompt_ids=1,2,3 --json
  # prompt, format and sampling settings of a training config:
  python tools/sample.py --model=WORKDIR --config=configs/demo.py \
      --prompt="Name a country bordering Peru." [--config.sampler.top_p=0.9]

--config: an experiment config, default configs/base.py, with
``--config.x=y`` overrides: the one place the settings come from. Its
reward format (mode, K, require_think), task family (data.family), sampler
settings (max_new_tokens, temperature, top_p, top_k, cache_dtype, slots)
and seed are used, so prompts and completions are those of the run.
--model defaults to the config's model.path.
--prompt is rendered with the tokenizer's chat template and the mode's
system prompt (--nosystem_prompt: the prompt alone, no answers parsed)
unless --raw. --json prints one object per completion: prompt,
completion, token_ids, logprobs (+ answers, confidences and format_ok
with the system prompt).
"""

import dataclasses
import json
import sys

import jax
import numpy as np
from absl import app, flags, logging

from multians_jax import config, sharding, sources
from multians_jax.data import prompts
from multians_jax.model import sampler
from multians_jax.rl import parsing, reward

_CONFIG = config.tool_config_flag("Experiment config: sample as it does.")
_MODEL = flags.DEFINE_string("model", None, "Model source (config's path).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Prompt text (repeatable).")
_IDS = flags.DEFINE_multi_string("prompt_ids", [], "Comma-separated ids.")
_RAW = flags.DEFINE_bool("raw", False, "Do not apply the chat template.")
_SYSTEM = flags.DEFINE_bool(
  "system_prompt", True, "Render the mode's system prompt; parse answers."
)
_N = flags.DEFINE_integer("num_samples", 1, "Completions per prompt.")
_JSON = flags.DEFINE_bool("json", False, "One JSON object per completion.")


@dataclasses.dataclass(frozen=True)
class Settings:
  model: str
  rcfg: reward.RewardConfig | None  # None: no answer format
  family: str
  sampling: sampler.SamplingConfig  # stop and pad ids come from the model
  seed: int


def settings() -> Settings:
  run = config.tool_run_config(_CONFIG)
  return Settings(
    _MODEL.value or run.model.path,
    run.reward if _SYSTEM.value else None,
    run.data.family,
    run.sampling,
    run.seed,
  )


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
    jax.random.key(st.seed),
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
