"""The KV cache of the decoder: per-layer keys and values, which slots
hold real tokens, and the next slot to write."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from multians_jax.model.config import DTYPES, ModelConfig


@struct.dataclass
class KVCache:
  """Per-layer keys/values, valid slots [B, S], next slot.

  ``k``/``v`` are stacked [L, B, K, S, H] arrays (what ``zeros`` builds and
  the scanned forward reads), or the *decode layout* from ``unstacked``:
  tuples of L per-layer buffers. In a ``while_loop`` carry each per-layer
  buffer is then updated in place by one ``dynamic_update_slice`` and
  attention reads it directly, whereas a scan over the stacked cache
  copies every layer's slice (the scan's ``xs``) on every decode step.

  ``key_layout`` is how the keys are stored: ``"sh"`` [.., K, S, H] like the
  values, or ``"hs"`` [.., K, H, S] (``unstacked(key_layout="hs")``, the
  XLA decode step's choice: the scores q·kᵀ are then a plain matmul over H
  instead of one contracting both operands' minor dimension, which
  XLA:CPU runs several times slower; see ``attention.decode_key_layout``).
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array  # bool [B, S]: slot holds a real token
  index: jax.Array  # int32 []: next slot to write; or [B], one per row
  key_layout: str = struct.field(pytree_node=False, default="sh")

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

  @property
  def is_stacked(self) -> bool:
    return not isinstance(self.k, (tuple, list))

  def unstacked(self, key_layout: str = "sh") -> KVCache:
    """The decode layout: tuples of per-layer [B, K, S, H] buffers (the
    keys [B, K, H, S] with ``key_layout="hs"``)."""
    if not self.is_stacked:
      if key_layout != self.key_layout:
        raise ValueError(
          f"cache is unstacked with key_layout {self.key_layout!r}, "
          f"not {key_layout!r}"
        )
      return self
    if key_layout not in KEY_LAYOUTS:
      raise ValueError(
        f"key_layout must be one of {KEY_LAYOUTS}: {key_layout!r}"
      )
    if self.key_layout != "sh":
      raise ValueError("a stacked cache stores its keys [L, B, K, S, H]")
    n = self.k.shape[0]
    hs = key_layout == "hs"
    return self.replace(
      k=tuple(self.k[i].swapaxes(2, 3) if hs else self.k[i] for i in range(n)),
      v=tuple(self.v[i] for i in range(n)),
      key_layout=key_layout,
    )

  def axes(self) -> tuple[tuple, tuple]:
    """Logical sharding axes of the (per-layer, if unstacked) k and v."""
    axes = CACHE_AXES if self.is_stacked else CACHE_AXES[1:]
    if self.key_layout == "hs":
      return (*axes[:-2], axes[-1], axes[-2]), axes
    return axes, axes


KEY_LAYOUTS = ("sh", "hs")
CACHE_AXES = ("layers", "batch", "act_kv_heads", "cache_seq", "head_dim")
