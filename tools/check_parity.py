r"""Compares our logits with ``transformers`` on a few prompts.

Usage:
  python tools/check_parity.py --ckpt=DIR --hf=DIR [--prompt=TEXT ...]

--ckpt is any model path we load (checkpoint dir, HF dir, .gguf); --hf is an
HF directory (or a .gguf file, loaded by transformers' own GGUF reader).
Prints the max |Δlogits| and the mean KL(ref || ours) over real tokens, and
exits non-zero when the max difference exceeds --tol.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from multians_jax import sharding, sources

_CKPT = flags.DEFINE_string("ckpt", None, "Our model path.")
_HF = flags.DEFINE_string("hf", None, "Reference HF directory or .gguf file.")
_PROMPTS = flags.DEFINE_multi_string(
  "prompt",
  ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 5, 8,"],
  "Prompts (repeatable).",
)
_TOL = flags.DEFINE_float("tol", 1e-3, "Max allowed |Δlogits|.")
flags.mark_flags_as_required(["ckpt", "hf"])


def reference(path):
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  kw = {}
  if path.endswith(".gguf"):
    kw = {"gguf_file": os.path.basename(path)}
    path = os.path.dirname(path)
  tok = AutoTokenizer.from_pretrained(path, **kw)
  ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
  return tok, ref.eval()


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import torch

  tok, ref = reference(_HF.value)
  mesh = sharding.make_mesh()
  ours, _, _ = sources.load_model(_CKPT.value, mesh, sharding.TRAIN_RULES)
  tok.padding_side = "left"
  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  enc = tok(_PROMPTS.value, return_tensors="np", padding=True)
  ids, mask = enc["input_ids"], enc["attention_mask"].astype(bool)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    want = ref(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask.astype(np.int64)),
      position_ids=torch.tensor(pos),
    ).logits.numpy()
  got, _ = ours(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
  got = np.asarray(got)
  diff = np.abs(got - want)[mask].max()
  lp = lambda x: np.asarray(jax.nn.log_softmax(jnp.asarray(x), -1))
  pr, pg = lp(want), lp(got)
  kl = (np.exp(pr) * (pr - pg)).sum(-1)[mask].mean()
  print(f"max_abs_diff={diff:.3e} mean_kl={kl:.3e} tokens={int(mask.sum())}")
  sys.exit(0 if diff <= _TOL.value else 1)


if __name__ == "__main__":
  app.run(main)
