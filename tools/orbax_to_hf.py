r"""Exports a checkpoint step to a Hugging Face ``transformers`` directory.

Usage:
  python tools/orbax_to_hf.py --ckpt=DIR [--step=N] --out=DIR [--dtype=bfloat16]
      [--adapters=DIR]

Writes config.json, generation_config.json, model.safetensors (sharded with an
index above --max_shard_gb), the tokenizer files and a model card (README.md:
the run's config and evaluations when the checkpoint is a run's), loadable
with ``AutoModelForCausalLM.from_pretrained(DIR)`` / ``AutoTokenizer``. Works on
imported checkpoints and on training checkpoints (default: latest step).
A LoRA run's checkpoint is exported merged (W + (alpha / r)·A·B);
``--adapters=DIR`` also writes the adapters alone in PEFT's layout
(``peft.PeftModel.from_pretrained(base, DIR)``).
"""

import os

from absl import app, flags, logging

from multians_jax import sharding, sources
from multians_jax.interop import hf
from multians_jax.report import card

_CKPT = flags.DEFINE_string("ckpt", None, "Checkpoint directory.")
_STEP = flags.DEFINE_integer("step", None, "Step to export (default: latest).")
_OUT = flags.DEFINE_string("out", None, "Output HF directory.")
_DTYPE = flags.DEFINE_enum(
  "dtype", None, ["float32", "bfloat16"], "Export dtype (default: as stored)."
)
_SHARD = flags.DEFINE_float("max_shard_gb", 2.0, "Max size of one file (GB).")
_ADAPTERS = flags.DEFINE_string(
  "adapters", None, "Also write a LoRA checkpoint's adapters here (PEFT)."
)
flags.mark_flags_as_required(["ckpt", "out"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  mesh = sharding.make_mesh()
  model, cfg, tok = sources.load_model(
    _CKPT.value, mesh, sharding.TRAIN_RULES, step=_STEP.value
  )
  hf.save(
    model,
    _OUT.value,
    tokenizer=tok,
    max_shard_bytes=int(_SHARD.value * 2**30),
    dtype=_DTYPE.value,
  )
  kind, path = sources.resolve(_CKPT.value)
  run_config = summaries = step = None
  path = os.path.abspath(path)
  if kind == "checkpoint" and os.path.basename(path) == "checkpoints":
    run_config, summaries, step = card.from_workdir(os.path.dirname(path))
  if summaries and _STEP.value not in (None, step):  # not the evaluated step
    summaries = {k: v for k, v in summaries.items() if k != "after"}
    step = _STEP.value
  card.write_card(
    _OUT.value,
    cfg,
    run_config=run_config,
    summaries=summaries,
    step=step,
  )
  print(f"wrote {_OUT.value} ({cfg.family}, {cfg.num_layers} layers)")
  if _ADAPTERS.value:
    if not cfg.lora_rank:
      raise app.UsageError(f"--adapters: {_CKPT.value} has no LoRA adapters")
    hf.save_adapters(model, _ADAPTERS.value, dtype=_DTYPE.value)
    print(f"wrote {_ADAPTERS.value} (LoRA rank {cfg.lora_rank}, PEFT layout)")


if __name__ == "__main__":
  app.run(main)
