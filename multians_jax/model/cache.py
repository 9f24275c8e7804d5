"""The KV caches of the decoder: which slots hold real tokens, the next slot
to write, and the keys and values, in one of two layouts.

``KVCache`` is the stacked layout: [L, B, K, S, H] arrays, what ``zeros``
builds and the scanned forward (``Transformer.hidden``, the prefill)
reads and writes. ``DecodeCache`` is the decode layout
(``KVCache.for_decode``): tuples of L per-layer buffers, run by the
unrolled decode step (``Transformer.decode_hidden``). In a ``while_loop``
carry each per-layer buffer is updated in place by one
``dynamic_update_slice`` and attention reads it directly, whereas a scan
over the stacked cache copies every layer's slice (the scan's ``xs``) on
every decode step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from multians_jax import sharding
from multians_jax.model.config import DTYPES, ModelConfig

KEY_LAYOUTS = ("sh", "hs")
CACHE_AXES = ("layers", "batch", "act_kv_heads", "cache_seq", "head_dim")


@struct.dataclass
class KVCache:
  """Stacked keys and values [L, B, K, S, H], valid slots [B, S] and the
  next slot to write (one for every row)."""

  k: jax.Array
  v: jax.Array
  mask: jax.Array  # bool [B, S]: slot holds a real token
  index: jax.Array  # int32 []: next slot to write

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, slots: int, dtype=None):
    dtype = dtype or DTYPES[cfg.dtype]
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, slots, cfg.head_dim)
    return cls(
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      mask=jnp.zeros((batch, slots), bool),
      index=jnp.zeros((), jnp.int32),
    )

  def for_decode(self, key_layout: str = "sh") -> DecodeCache:
    """The decode layout of this cache: per-layer [B, K, S, H] buffers
    (the keys [B, K, H, S] with ``key_layout="hs"``)."""
    if key_layout not in KEY_LAYOUTS:
      raise ValueError(
        f"key_layout must be one of {KEY_LAYOUTS}: {key_layout!r}"
      )
    n = self.k.shape[0]
    hs = key_layout == "hs"
    return DecodeCache(
      k=tuple(self.k[i].swapaxes(2, 3) if hs else self.k[i] for i in range(n)),
      v=tuple(self.v[i] for i in range(n)),
      mask=self.mask,
      index=self.index,
      key_layout=key_layout,
    )

  def constrained(self) -> KVCache:
    """The arrays under the cache's logical sharding."""
    return self.replace(
      k=sharding.constrain(self.k, CACHE_AXES),
      v=sharding.constrain(self.v, CACHE_AXES),
    )


@struct.dataclass
class DecodeCache:
  """The decode layout: per-layer buffers, valid slots [B, S] and the next
  slot to write, one for every row ([]) or one per row ([B], the refilling
  sampler's slots, each at its own column).

  ``key_layout`` is how the keys are stored: ``"sh"`` [B, K, S, H] like the
  values, or ``"hs"`` [B, K, H, S] (the XLA decode step's choice: the scores
  q·kᵀ are then a plain matmul over H instead of one contracting both
  operands' minor dimension, which XLA:CPU runs several times slower; see
  ``attention.decode_key_layout``).
  """

  k: tuple[jax.Array, ...]  # L x [B, K, S, H] (keys [B, K, H, S] if "hs")
  v: tuple[jax.Array, ...]  # L x [B, K, S, H]
  mask: jax.Array  # bool [B, S]
  index: jax.Array  # int32 [] or [B]
  key_layout: str = struct.field(pytree_node=False, default="sh")

  @property
  def per_row(self) -> bool:
    """Each row writes its own slot (a [B] index; one token per row)."""
    return jnp.ndim(self.index) == 1

  def axes(self) -> tuple[tuple, tuple]:
    """Logical sharding axes of one layer's keys and values."""
    axes = CACHE_AXES[1:]
    if self.key_layout == "hs":
      return (*axes[:-2], axes[-1], axes[-2]), axes
    return axes, axes

  def constrained(self) -> DecodeCache:
    """The buffers under the cache's logical sharding."""
    k_axes, v_axes = self.axes()
    one = lambda xs, axes: tuple(sharding.constrain(x, axes) for x in xs)
    return self.replace(k=one(self.k, k_axes), v=one(self.v, v_axes))
