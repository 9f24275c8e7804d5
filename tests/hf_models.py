"""Tiny random `transformers` models for parity tests (no download).

``torch`` here is imported on first use: without torch (a test extra), a
test that needs it skips and its module's pure-JAX tests still run.
"""

import pytest
import transformers as tr


class _LazyTorch:
  def __getattr__(self, name):
    if name.startswith("__") or name == "pytestmark":  # pytest's probes
      raise AttributeError(name)
    return getattr(pytest.importorskip("torch"), name)


torch = _LazyTorch()

FAMILY_CONFIGS = {
  "llama": tr.LlamaConfig,
  "qwen2": tr.Qwen2Config,
  "qwen3": tr.Qwen3Config,
}


def tiny_hf(
  family,
  *,
  heads=6,
  kv=2,
  head_dim=8,
  tied=False,
  theta=1e4,
  layers=2,
  hidden=48,
  ffn=72,
  vocab=101,
  seed=0,
  **kw,
):
  """A random CausalLM of ``family`` in float32 eval mode."""
  torch.manual_seed(seed)
  cfg = FAMILY_CONFIGS[family](
    vocab_size=vocab,
    hidden_size=hidden,
    intermediate_size=ffn,
    num_hidden_layers=layers,
    num_attention_heads=heads,
    num_key_value_heads=kv,
    head_dim=head_dim,
    tie_word_embeddings=tied,
    rope_theta=theta,
    max_position_embeddings=256,
    **kw,
  )
  model = tr.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
  with torch.no_grad():  # non-trivial norms and biases
    for name, p in model.named_parameters():
      if "norm" in name or "bias" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def ragged_batch(vocab, lengths, total, seed=0):
  """Left-padded ids [B, T], mask [B, T] and positions for given lengths."""
  import numpy as np

  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, size=(len(lengths), total))
  mask = np.zeros((len(lengths), total), bool)
  for i, n in enumerate(lengths):
    mask[i, total - n :] = True
  ids = np.where(mask, ids, 0)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  return ids, mask, pos


def hf_logits(model, ids, mask, pos):
  with torch.no_grad():
    return model(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask.astype("int64")),
      position_ids=torch.tensor(pos),
    ).logits.numpy()
