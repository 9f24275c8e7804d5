r"""Imports a Hugging Face model directory or a GGUF file as a checkpoint.

Usage:
  python tools/hf_to_orbax.py --src=PATH --out=DIR [--param_dtype=float32]

PATH is a directory with config.json + *.safetensors (single or sharded with
an index) or a .gguf file (Llama / Qwen2 architectures; F32, F16, BF16, Q8_0,
Q4_0, Q4_1, … tensors are dequantised). The tokenizer is stored alongside.
Weights are loaded shard by shard straight into the mesh's layout.
"""

from absl import app, flags, logging

from multians_jax import sharding, sources

_SRC = flags.DEFINE_string("src", None, "HF model directory or .gguf file.")
_OUT = flags.DEFINE_string("out", None, "New checkpoint directory.")
_DTYPE = flags.DEFINE_enum(
  "param_dtype", "float32", ["float32", "bfloat16"], "Stored parameter dtype."
)
_FSDP = flags.DEFINE_integer("fsdp", -1, "Mesh fsdp size (-1: all devices).")
_TENSOR = flags.DEFINE_integer("tensor", 1, "Mesh tensor size.")
flags.mark_flags_as_required(["src", "out"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  mesh = sharding.make_mesh(fsdp=_FSDP.value, tensor=_TENSOR.value)
  n = sources.import_model(
    _SRC.value,
    _OUT.value,
    mesh,
    sharding.TRAIN_RULES,
    param_dtype=_DTYPE.value,
  )
  print(f"wrote {_OUT.value} (step 0, {n:,} parameters)")


if __name__ == "__main__":
  app.run(main)
