"""The support of the sampling distribution (top-k / top-p), shared by the
sampler, which draws from it, and the loss, which scores the sampled tokens
on the same support (so the importance ratio is 1 on-policy)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Support:
  """The support of the sampling distribution: top-k, then nucleus (top-p)
  truncation of softmax(logits / temperature) (``sampler.top_k`` /
  ``top_p``). Log-probs under a truncated support are renormalised over
  the kept tokens, so the sampler's and the trainer's agree and the
  importance ratio stays 1 on-policy. The default keeps every token."""

  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off

  @property
  def full(self) -> bool:
    return not self.top_k and self.top_p >= 1.0


FULL = Support()  # every token kept


def support_mask(z: jax.Array, support: Support) -> jax.Array:
  """bool [..., V]: the tokens ``support`` keeps of scaled logits ``z``.

  Top-k keeps the k largest (ties at the k-th value included); top-p then
  keeps the smallest prefix of the remaining tokens, by descending
  probability, whose mass reaches ``top_p`` (at least one token).
  """
  keep = jnp.ones(z.shape, bool)
  if support.top_k:
    keep = z >= jax.lax.top_k(z, support.top_k)[0][..., -1:]
  if support.top_p < 1.0:
    srt = jnp.sort(jnp.where(keep, z, -jnp.inf), axis=-1)[..., ::-1]
    p = jax.nn.softmax(srt, axis=-1)
    kept = (jnp.cumsum(p, axis=-1) - p) < support.top_p
    cutoff = jnp.min(jnp.where(kept, srt, jnp.inf), axis=-1, keepdims=True)
    keep = keep & (z >= cutoff)
  return keep
