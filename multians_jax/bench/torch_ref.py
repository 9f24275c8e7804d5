"""The torch references of the benchmarks, importable without JAX.

``tools/bench_ab.py`` runs them in processes that never import JAX (so
neither side shares a process, a thread pool or a heap with the other);
``tools/bench.py`` calls the same functions.
"""

from __future__ import annotations

import os
import time

import numpy as np


def load(hf_dir, train: bool = False):
  """The fp32 transformers model of ``hf_dir``, torch on every core."""
  import torch
  from transformers import AutoModelForCausalLM

  torch.set_num_threads(os.cpu_count() or 1)
  ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  return ref.train() if train else ref.eval()


def time_transformers(hf_dir, ids, g: int, new: int, temperature: float):
  """Warm time of ``generate`` on the B = P·G rows (prompt-major)."""
  import torch

  ref = load(hf_dir)
  rows = torch.tensor(np.repeat(ids, g, axis=0), dtype=torch.long)
  kw = dict(
    attention_mask=torch.ones_like(rows),
    do_sample=True,
    temperature=temperature,
    top_k=0,
    top_p=1.0,
    pad_token_id=0,
  )
  with torch.inference_mode():
    ref.generate(rows, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
    torch.manual_seed(0)
    t0 = time.perf_counter()
    out = ref.generate(rows, max_new_tokens=new, min_new_tokens=new, **kw)
    dt = time.perf_counter() - t0
  return dt, int(out.shape[1] - rows.shape[1])


TORCH_INPUTS = ("tokens", "adv", "old_logp")


def torch_update(hf_dir, arrays, micro: int, comp: int) -> float:
  """A transformers fwd + bwd (the PG loss of ``update``) + AdamW step on
  ``arrays`` (``TORCH_INPUTS``), in M micro-batches: its warm time (s)."""
  import torch

  ref = load(hf_dir, train=True)
  opt = torch.optim.AdamW(ref.parameters(), lr=1e-6, weight_decay=0.0)
  tokens = torch.tensor(arrays["tokens"], dtype=torch.long)
  adv = torch.tensor(arrays["adv"])
  old = torch.tensor(arrays["old_logp"])

  def step(rows):
    opt.zero_grad(set_to_none=True)
    for chunk in torch.chunk(torch.arange(rows), micro):
      x = tokens[chunk]
      # Logits for the completion positions only (as our loss computes).
      logits = ref(x, logits_to_keep=comp + 1).logits[:, :-1]
      logp = torch.log_softmax(logits / 0.7, -1)
      logp = logp.gather(-1, x[:, -comp:, None])[..., 0]
      ratio = torch.exp(logp - old[chunk])
      a = adv[chunk, None]
      obj = torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
      (-obj.sum() / (rows * comp)).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    opt.step()

  step(micro)  # warm-up on M rows (allocations, optimizer state)
  t0 = time.perf_counter()
  step(tokens.shape[0])
  return time.perf_counter() - t0
