"""Decoder-only transformer (Llama / Qwen2 / Qwen3 families) in Flax NNX.

Shape letters: B batch, T query tokens, S key/cache slots, D model dim,
N query heads, K key/value heads, G = N // K query heads per KV head,
H head dim, F MLP hidden dim, V vocab, L layers.

Layer parameters are stacked on a leading ``L`` axis and the decoder runs as
one ``jax.lax.scan``: compile time does not grow with depth (SmolLM2's 30
layers compile as fast as 2). The KV cache is a scan carry updated in place.

One forward serves training (no cache), prefill and decode (cache): tokens
come with explicit ``positions`` (RoPE) and a ``mask`` of real tokens, so
left padding never relies on a pad id.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from multians_jax import sharding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FAMILIES = ("llama", "qwen2", "qwen3")
REMAT = ("none", "full", "dots")
# Projections that take low-rank adapters, and their Hugging Face names.
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
HF_PROJ = {
  "q_proj": "wq",
  "k_proj": "wk",
  "v_proj": "wv",
  "o_proj": "wo",
  "gate_proj": "w_gate",
  "up_proj": "w_up",
  "down_proj": "w_down",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a decoder. Hashable (static under jit)."""

  family: str  # llama | qwen2 | qwen3
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  rope_theta: float = 10000.0
  rope_type: str = "default"  # default | llama3
  rope_factor: float = 1.0  # llama3 scaling fields
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_pos: int = 8192
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2
  qk_norm: bool = False  # Qwen3
  max_seq_len: int = 4096
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype
  remat: str = "none"  # none | full | dots (save matmul outputs)
  # LoRA: rank r > 0 adds adapters A [in, r], B [r, out] to each target
  # projection, y = x·W + (alpha / r)·(x·A)·B (lora.py; B starts at zero).
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = LORA_TARGETS  # ours or HF names ("q_proj")

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"model.family must be one of {FAMILIES}: {self.family}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"model.num_heads ({self.num_heads}) must be a multiple of "
        f"model.num_kv_heads ({self.num_kv_heads})"
      )
    if self.rope_type not in ("default", "llama3"):
      raise ValueError(f"model.rope_type unsupported: {self.rope_type}")
    for f in ("param_dtype", "dtype"):
      if getattr(self, f) not in DTYPES:
        raise ValueError(f"model.{f} must be one of {tuple(DTYPES)}")
    if self.remat not in REMAT:
      raise ValueError(f"model.remat must be one of {REMAT}: {self.remat}")
    targets = check_lora(self.lora_rank, self.lora_alpha, self.lora_targets)
    object.__setattr__(self, "lora_targets", targets)

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)

  @property
  def eos_ids(self) -> tuple[int, ...]:
    e = self.eos_token_id
    return () if e is None else (e,) if isinstance(e, int) else tuple(e)


def check_lora(rank: int, alpha: float, targets) -> tuple[str, ...]:
  """Validates ``model.lora_*``; returns the targets in canonical form."""
  names = lora_targets(targets)
  if rank < 0:
    raise ValueError(f"model.lora_rank must be >= 0: {rank}")
  if rank and not alpha > 0:
    raise ValueError(f"model.lora_alpha must be > 0: {alpha}")
  if rank and not names:
    raise ValueError("model.lora_targets is empty: name the projections")
  return names


def lora_targets(targets) -> tuple[str, ...]:
  """Target projections (a sequence, or one comma-separated string; ``all``
  = every projection) → our names in canonical order."""
  if isinstance(targets, str):
    targets = [t.strip() for t in targets.split(",") if t.strip()]
  names = set()
  for t in targets:
    if t == "all":
      names.update(LORA_TARGETS)
      continue
    name = HF_PROJ.get(t, t)
    if name not in LORA_TARGETS:
      raise ValueError(
        f"model.lora_targets: unknown projection {t!r}; known: "
        f"{LORA_TARGETS} or {tuple(HF_PROJ)}"
      )
    names.add(name)
  return tuple(n for n in LORA_TARGETS if n in names)


PRESETS: dict[str, ModelConfig] = {
    "smollm2_135m": ModelConfig(
        "llama", 49152, 576, 30, 9, 3, 64, 1536, rope_theta=1e5,
        norm_eps=1e-5, tie_embeddings=True, max_seq_len=8192,
        bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "qwen3_0_6b": ModelConfig(
        "qwen3", 151936, 1024, 28, 16, 8, 128, 3072, rope_theta=1e6,
        tie_embeddings=True, qk_norm=True, max_seq_len=40960,
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643),
    "qwen3_1_7b": ModelConfig(
        "qwen3", 151936, 2048, 28, 16, 8, 128, 6144, rope_theta=1e6,
        tie_embeddings=True, qk_norm=True, max_seq_len=40960,
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643),
    "qwen3_8b": ModelConfig(
        "qwen3", 151936, 4096, 36, 32, 8, 128, 12288, rope_theta=1e6,
        qk_norm=True, max_seq_len=40960,
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643),
    "qwen2_5_7b": ModelConfig(
        "qwen2", 152064, 3584, 28, 28, 4, 128, 18944, rope_theta=1e6,
        qkv_bias=True, max_seq_len=32768,
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643),
    "llama3_8b": ModelConfig(
        "llama", 128256, 4096, 32, 32, 8, 128, 14336, rope_theta=5e5,
        norm_eps=1e-5, max_seq_len=8192,
        bos_token_id=128000, eos_token_id=128001),
    "llama3_1_8b": ModelConfig(
        "llama", 128256, 4096, 32, 32, 8, 128, 14336, rope_theta=5e5,
        rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_original_max_pos=8192,
        norm_eps=1e-5, max_seq_len=131072,
        bos_token_id=128000, eos_token_id=(128001, 128008, 128009)),
}  # fmt: skip


def preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


# ---------------------------------------------------------------------------
# KV cache


@struct.dataclass
class KVCache:
  """Per-layer keys/values, valid slots [B, S], next slot.

  ``k``/``v`` are stacked [L, B, K, S, H] arrays (what ``zeros`` builds and
  the scanned forward reads), or the *decode layout* from ``unstacked``:
  tuples of L per-layer [B, K, S, H] arrays. In a ``while_loop`` carry each
  per-layer buffer is then updated in place by one ``dynamic_update_slice``
  and attention reads it directly, whereas a scan over the stacked cache
  copies every layer's slice (the scan's ``xs``) on every decode step.
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array  # bool [B, S]: slot holds a real token
  index: jax.Array  # int32 scalar: next slot to write

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

  def unstacked(self) -> KVCache:
    """The decode layout: tuples of per-layer [B, K, S, H] buffers."""
    if not self.is_stacked:
      return self
    n = self.k.shape[0]
    return self.replace(
      k=tuple(self.k[i] for i in range(n)),
      v=tuple(self.v[i] for i in range(n)),
    )

  def stacked(self) -> KVCache:
    """The [L, B, K, S, H] layout."""
    if self.is_stacked:
      return self
    return self.replace(k=jnp.stack(self.k), v=jnp.stack(self.v))


CACHE_AXES = ("layers", "batch", "act_kv_heads", "cache_seq", "head_dim")

# ---------------------------------------------------------------------------
# Building blocks (pure functions of arrays)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (xf * w.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse frequencies [H/2], with ``llama3`` scaling as in transformers."""
  h = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  if cfg.rope_type == "llama3":
    low_wl = cfg.rope_original_max_pos / cfg.rope_low_freq_factor
    high_wl = cfg.rope_original_max_pos / cfg.rope_high_freq_factor
    wl = 2 * math.pi / inv
    scaled = jnp.where(wl > low_wl, inv / cfg.rope_factor, inv)
    smooth = (cfg.rope_original_max_pos / wl - cfg.rope_low_freq_factor) / (
      cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    mid = (wl >= high_wl) & (wl <= low_wl)
    inv = jnp.where(mid, smoothed, scaled)
  return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv: jax.Array):
  """Rotate-half RoPE (HF layout). x [B, T, n, H], positions [B, T]."""
  freqs = positions[..., None].astype(jnp.float32) * inv  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rot = jnp.concatenate([-x2, x1], axis=-1)
  return (x.astype(jnp.float32) * cos + rot * sin).astype(x.dtype)


def attention(q, k, v, allowed, dtype, with_lse: bool = False):
  """q [B,T,N,H], k/v [B,K,S,H], allowed [B,T,S] → [B,T,N,H].

  Keys/values are head-major ([B,K,S,H], the cache layout), so both
  contractions are plain batched matmuls over (B, K). ``with_lse`` also
  returns the log-sum-exp of the scaled scores, float32 [B,T,N], so that
  attention over disjoint key sets can be merged exactly
  (``merge_attention``).
  """
  b, t, n, h = q.shape
  kv = k.shape[1]
  g = n // kv
  q = (
    q.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)
  )
  s = jnp.einsum("bkqh,bksh->bkqs", q, k, preferred_element_type=jnp.float32)
  s = s.reshape(b, kv, g, t, -1) * (h**-0.5)
  s = jnp.where(allowed[:, None, None], s, jnp.finfo(jnp.float32).min)
  if with_lse:
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    e = jnp.exp(s - m)
    z = jnp.sum(e, axis=-1, keepdims=True)
    p = e / z
    lse = (m + jnp.log(z))[..., 0].transpose(0, 3, 1, 2).reshape(b, t, n)
  else:
    p = jax.nn.softmax(s, axis=-1)
  p = p.astype(dtype).reshape(b, kv, g * t, -1)
  o = jnp.einsum("bkqs,bksh->bkqh", p, v).reshape(b, kv, g, t, h)
  o = o.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  return (o, lse) if with_lse else o


def merge_attention(o1, lse1, o2, lse2):
  """Attention over the union of two disjoint key sets from its parts.

  o [B,T,N,H] and lse [B,T,N] of each part (``attention(with_lse=True)``):
  softmax over the union = each part's softmax weighted by exp(lseᵢ − lse).
  """
  lse = jnp.logaddexp(lse1, lse2)
  w1 = jnp.exp(lse1 - lse)[..., None]
  w2 = jnp.exp(lse2 - lse)[..., None]
  return (o1 * w1 + o2 * w2).astype(o1.dtype)


def shared_prefix_attention(q, kp, vp, prefix_mask, k, v, allowed, dtype):
  """Attention of grouped rows over a shared prefix and their own tokens.

  q [B,L,N,H], own k/v [B,K,L,H], allowed [B,L,L] (causal and padding
  within the row); prefix k/v [P,K,T,H] with prefix_mask [P,T], where rows
  are prefix-major: rows i·s … i·s + s − 1 (s = B / P) continue prefix i.
  Each row's queries attend to its prefix's valid tokens and to its own
  allowed tokens: the same as attention over the concatenated sequence,
  with the prefix's keys computed once for all s rows.
  """
  b, n_q, n, h = q.shape
  p = kp.shape[0]
  s = b // p
  q1 = q.reshape(p, s * n_q, n, h)  # all s rows' queries against the prefix
  pre = jnp.broadcast_to(prefix_mask[:, None, :], (p, s * n_q, kp.shape[2]))
  o1, lse1 = attention(q1, kp, vp, pre, dtype, with_lse=True)
  o1, lse1 = o1.reshape(b, n_q, n, h), lse1.reshape(b, n_q, n)
  o2, lse2 = attention(q, k, v, allowed, dtype, with_lse=True)
  return merge_attention(o1, lse1, o2, lse2)


def dense(x: jax.Array, w: jax.Array, out_shape: tuple[int, ...]):
  """x [B, T, I] × w [I, O...] → [B, T, *out_shape] as one 2-D matmul.

  The activations are flattened to [B·T, I] and the weight to [I, O]: on
  XLA:CPU the backward of a plain 2-D matmul (dW = xᵀ·dy contracting one
  B·T dimension) runs ~25 % faster than that of the equivalent 3-D einsum,
  and on TPU/GPU both lower to the same dot. Reshapes of contiguous leading
  or trailing dims are free.
  """
  b, t = x.shape[:2]
  y = x.reshape(b * t, -1) @ w.reshape(x.shape[-1], -1)
  return y.reshape(b, t, *out_shape)


def project(cfg: ModelConfig, x, p, name: str, out_shape: tuple[int, ...]):
  """x · p[name] (+ the LoRA update (alpha / r)·(x·A)·B when p holds the
  projection's adapters): the weights are never merged, so the sampler and
  the update step read the same base arrays every step."""
  dt = DTYPES[cfg.dtype]
  y = dense(x, p[name].astype(dt), out_shape)
  a = p.get(f"{name}_lora_a")
  if a is None:
    return y
  r = cfg.lora_rank
  low = sharding.constrain(dense(x, a.astype(dt), (r,)), ("batch", None, None))
  scale = jnp.asarray(cfg.lora_alpha / r, dt)
  return y + scale * dense(low, p[f"{name}_lora_b"].astype(dt), out_shape)


def _qkv(cfg: ModelConfig, x, p, positions, inv_freq):
  """Attention norm, projections, bias / q-k norm, RoPE of x [B,T,D]:
  q [B,T,N,H]; k, v head-major [B,K,T,H]."""
  dt = DTYPES[cfg.dtype]
  c = lambda w: w.astype(dt)
  n, kh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  h = rms_norm(x, p["attn_norm"], cfg.norm_eps)
  q = project(cfg, h, p, "wq", (n, hd))
  k = project(cfg, h, p, "wk", (kh, hd))
  v = project(cfg, h, p, "wv", (kh, hd))
  if cfg.qkv_bias:
    q, k, v = q + c(p["bq"]), k + c(p["bk"]), v + c(p["bv"])
  if cfg.qk_norm:
    q = rms_norm(q, p["q_norm"], cfg.norm_eps)
    k = rms_norm(k, p["k_norm"], cfg.norm_eps)
  q = apply_rope(q, positions, inv_freq)
  k = apply_rope(k, positions, inv_freq)
  q = sharding.constrain(q, ("batch", None, "act_heads", None))
  return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _out_and_mlp(cfg: ModelConfig, x, o, p):
  """Output projection of attention o [B,T,N,H], residual, MLP block."""
  # (N, H) flattened into one contraction: a plain [B·T, N·H] × [N·H, D]
  # matmul on the weight as stored (no per-call transposed copy of wo).
  o = o.reshape(*o.shape[:2], -1)
  x = x + project(cfg, o, p, "wo", (cfg.d_model,))
  x = sharding.constrain(x, ("batch", None, "act_embed"))
  h = rms_norm(x, p["mlp_norm"], cfg.norm_eps)
  g = project(cfg, h, p, "w_gate", (cfg.d_ff,))
  u = project(cfg, h, p, "w_up", (cfg.d_ff,))
  a = sharding.constrain(jax.nn.silu(g) * u, ("batch", None, "act_mlp"))
  x = x + project(cfg, a, p, "w_down", (cfg.d_model,))
  return sharding.constrain(x, ("batch", None, "act_embed"))


def layer_fn(cfg: ModelConfig, x, p, k_cache, v_cache, ctx):
  """One decoder layer. x [B,T,D]; k/v_cache [B,K,S,H] or None.

  ``ctx`` holds positions [B,T], allowed [B,T,S], write index, inv_freq.
  Returns (x, k, v): without a cache, k/v [B,K,T,H] are this call's keys and
  values; with one, the layer's cache with them written at ``index``
  (attention reads that updated buffer, so a per-layer cache carried by a
  ``while_loop`` is updated in place, never copied).
  """
  dt = DTYPES[cfg.dtype]
  q, k, v = _qkv(cfg, x, p, ctx["positions"], ctx["inv_freq"])
  if k_cache is not None:
    idx = (0, 0, ctx["index"], 0)
    k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), idx)
    v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), idx)
  o = attention(q, k.astype(dt), v.astype(dt), ctx["allowed"], dt)
  return _out_and_mlp(cfg, x, o, p), k, v


def shared_layer_fn(cfg: ModelConfig, xs, p, ctx):
  """One decoder layer over prefixes [P,T,D] and their rows [B,L,D].

  ``ctx``: prefix_positions / prefix_allowed [P,T(,T)], prefix_mask [P,T],
  positions [B,L], allowed [B,L,L], inv_freq. Returns the new (prefix,
  rows) pair; see ``Transformer.hidden_shared``.
  """
  dt = DTYPES[cfg.dtype]
  xp, x = xs
  qp, kp, vp = _qkv(cfg, xp, p, ctx["prefix_positions"], ctx["inv_freq"])
  q, k, v = _qkv(cfg, x, p, ctx["positions"], ctx["inv_freq"])
  op = attention(qp, kp, vp, ctx["prefix_allowed"], dt)
  o = shared_prefix_attention(
    q, kp, vp, ctx["prefix_mask"], k, v, ctx["allowed"], dt
  )
  return _out_and_mlp(cfg, xp, op, p), _out_and_mlp(cfg, x, o, p)


# ---------------------------------------------------------------------------
# Modules


def _param(rngs, shape, axes, dtype, init="normal"):
  kind = nnx.Param
  if init == "normal":
    value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
  elif init == "lora_a":  # PEFT's default: U(±1/√fan_in), fan_in = in dims
    kind = nnx.LoRAParam
    bound = 1.0 / math.sqrt(math.prod(shape[1:-1]))
    value = jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)
  elif init == "lora_b":
    kind = nnx.LoRAParam
    value = jnp.zeros(shape, jnp.float32)
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  else:
    value = jnp.zeros(shape, jnp.float32)
  return kind(value.astype(dtype), logical_axes=axes)


def layer_param_specs(cfg: ModelConfig) -> dict[str, tuple[tuple, tuple, str]]:
  """name → (shape without L, logical axes without 'layers', init)."""
  d, n, k, h, f = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads,
                   cfg.head_dim, cfg.d_ff)  # fmt: skip
  specs = {
    "attn_norm": ((d,), ("norm",), "ones"),
    "wq": ((d, n, h), ("embed", "q_heads", "head_dim"), "normal"),
    "wk": ((d, k, h), ("embed", "kv_heads", "head_dim"), "normal"),
    "wv": ((d, k, h), ("embed", "kv_heads", "head_dim"), "normal"),
    "wo": ((n, h, d), ("q_heads", "head_dim", "embed"), "normal"),
    "mlp_norm": ((d,), ("norm",), "ones"),
    "w_gate": ((d, f), ("embed", "mlp"), "normal"),
    "w_up": ((d, f), ("embed", "mlp"), "normal"),
    "w_down": ((f, d), ("mlp", "embed"), "normal"),
  }
  if cfg.qkv_bias:
    specs["bq"] = ((n, h), ("q_heads", "head_dim"), "zeros")
    specs["bk"] = ((k, h), ("kv_heads", "head_dim"), "zeros")
    specs["bv"] = ((k, h), ("kv_heads", "head_dim"), "zeros")
  if cfg.qk_norm:
    specs["q_norm"] = ((h,), ("head_dim",), "ones")
    specs["k_norm"] = ((h,), ("head_dim",), "ones")
  if cfg.lora_rank:
    specs.update(lora_param_specs(cfg, specs))
  return specs


def lora_param_specs(cfg: ModelConfig, base: dict) -> dict:
  """Adapters of each target projection W [I..., O...]: ``{name}_lora_a``
  [I..., r] and ``{name}_lora_b`` [r, O...] (``nnx.LoRAParam``). The rank
  axis is replicated; the others shard like W's."""
  r = cfg.lora_rank
  out = {}
  for name in cfg.lora_targets:
    shape, axes, _ = base[name]
    n_in = 2 if name == "wo" else 1  # wo contracts (N, H)
    out[f"{name}_lora_a"] = (
      (*shape[:n_in], r),
      (*axes[:n_in], "lora_rank"),
      "lora_a",
    )
    out[f"{name}_lora_b"] = (
      (r, *shape[n_in:]), ("lora_rank", *axes[n_in:]), "lora_b")  # fmt: skip
  return out


class Layers(nnx.Module):
  """All decoder layers, each parameter stacked on a leading L axis."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pdt = DTYPES[cfg.param_dtype]
    for name, (shape, axes, init) in layer_param_specs(cfg).items():
      full = (cfg.num_layers, *shape)
      # Adapters are float32 master weights whatever the base's dtype.
      dt = jnp.float32 if init.startswith("lora") else pdt
      setattr(self, name, _param(rngs, full, ("layers", *axes), dt, init))

  def arrays(self) -> dict[str, jax.Array]:
    return {
      k: v[...] for k, v in vars(self).items() if isinstance(v, nnx.Param)
    }


class Transformer(nnx.Module):
  """The decoder LM. ``__call__`` = ``logits(hidden(...))``."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = DTYPES[cfg.param_dtype]
    v, d = cfg.vocab_size, cfg.d_model
    self.embed = _param(rngs, (v, d), ("vocab", "embed"), pdt)
    self.layers = Layers(cfg, rngs=rngs)
    self.final_norm = _param(rngs, (d,), ("norm",), pdt, "ones")
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (d, v), ("embed", "vocab"), pdt)

  def head_weight(self) -> jax.Array:
    """LM head as [D, V] (the transposed embedding when tied)."""
    return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

  def hidden(self, tokens, positions, mask, cache: KVCache | None = None):
    """Final-normed hidden states [B, T, D] and the updated cache.

    Args:
      tokens: int [B, T]. positions: int [B, T] (RoPE positions).
      mask: bool [B, T], True for real tokens (padding is never attended).
      cache: optional KV cache; the T tokens go to slots index..index+T-1 and
        attend to every earlier valid slot.
    """
    return self.hidden_with(
      self.layers.arrays(), tokens, positions, mask, cache
    )

  def hidden_with(self, layers, tokens, positions, mask, cache=None):
    """``hidden`` with explicit layer parameters.

    ``layers`` is ``self.layers.arrays()`` (stacked [L, ...], run as a scan)
    or ``unstack_layers`` of it (a list of per-layer dicts, run as an
    unrolled loop with an unstacked cache: the sampler's decode step).
    """
    cfg = self.cfg
    dt = DTYPES[cfg.dtype]
    t = tokens.shape[1]
    x = self.embed[...].astype(dt)[tokens]
    x = sharding.constrain(x, ("batch", None, "act_embed"))
    if cache is None:
      key_mask, offset = mask, 0
    else:
      key_mask = jax.lax.dynamic_update_slice(
        cache.mask, mask, (0, cache.index)
      )
      offset = cache.index
    q_slot = offset + jnp.arange(t)
    k_slot = jnp.arange(key_mask.shape[1])
    allowed = key_mask[:, None, :] & (k_slot[None, :] <= q_slot[:, None])[None]
    ctx = {
      "positions": positions,
      "allowed": allowed,
      "index": offset,
      "inv_freq": rope_inv_freq(cfg),
    }
    x, new_kv = _run_layers(cfg, x, layers, cache, ctx)
    x = rms_norm(x, self.final_norm[...], cfg.norm_eps)
    if cache is not None:
      cache = KVCache(
        k=new_kv[0], v=new_kv[1], mask=key_mask, index=cache.index + t
      )
    return x, cache

  def hidden_shared(
    self,
    prefix_tokens,
    prefix_positions,
    prefix_mask,
    tokens,
    positions,
    mask,
  ):
    """Final-normed hidden states of rows that continue shared prefixes.

    Training on G completions of one prompt repeats the prompt G times;
    here each prefix (prompt) runs through the decoder once and every row
    attends to its prefix's keys and values: the hidden states equal those
    of ``hidden`` on the concatenated [prefix | row] sequences, at a cost of
    P·T + B·L tokens instead of B·(T + L).

    Args:
      prefix_tokens, prefix_positions, prefix_mask: [P, T] (left-padded).
      tokens, positions, mask: [B, L], B = P·s, prefix-major: rows
        i·s … i·s + s − 1 continue prefix i (``sampler.sample``'s order).

    Returns:
      (prefix hidden [P, T, D], row hidden [B, L, D]).
    """
    cfg = self.cfg
    dt = DTYPES[cfg.dtype]
    p, t = prefix_tokens.shape
    b, n = tokens.shape
    if b % p:
      raise ValueError(f"rows ({b}) must be a multiple of prefixes ({p})")
    emb = self.embed[...].astype(dt)
    axes = ("batch", None, "act_embed")
    xp = sharding.constrain(emb[prefix_tokens], axes)
    x = sharding.constrain(emb[tokens], axes)
    causal = lambda m: jnp.tril(jnp.ones((m, m), bool))[None]
    ctx = {
      "prefix_positions": prefix_positions,
      "prefix_allowed": prefix_mask[:, None, :] & causal(t),
      "prefix_mask": prefix_mask,
      "positions": positions,
      "allowed": mask[:, None, :] & causal(n),
      "inv_freq": rope_inv_freq(cfg),
    }
    body = _remat(cfg, lambda xs, lp: shared_layer_fn(cfg, xs, lp, ctx))
    (xp, x), _ = jax.lax.scan(
      lambda xs, lp: (body(xs, lp), None), (xp, x), self.layers.arrays()
    )
    norm = lambda h: rms_norm(h, self.final_norm[...], cfg.norm_eps)
    return norm(xp), norm(x)

  def logits(self, h: jax.Array) -> jax.Array:
    """[..., D] → float32 logits [..., V]."""
    w = self.head_weight().astype(DTYPES[self.cfg.dtype])
    out = jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)
    return sharding.constrain(
      out, ("batch",) + (None,) * (out.ndim - 2) + ("act_vocab",)
    )

  def __call__(self, tokens, positions, mask, cache: KVCache | None = None):
    h, cache = self.hidden(tokens, positions, mask, cache)
    return self.logits(h), cache


def unstack_layers(params: dict[str, jax.Array]) -> list[dict[str, jax.Array]]:
  """Stacked [L, ...] layer parameters → L per-layer dicts.

  Behind an optimisation barrier, so XLA materialises the slices once where
  this is called (before a decode loop) instead of sinking them into the
  loop body, where every step would copy every weight matrix.
  """
  n = next(iter(params.values())).shape[0]
  layers = [{k: v[i] for k, v in params.items()} for i in range(n)]
  return jax.lax.optimization_barrier(layers)


def _remat(cfg, fn):
  if cfg.remat == "none":
    return fn
  policy = (
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if cfg.remat == "dots"
    else None
  )
  return jax.checkpoint(fn, policy=policy)


def _layer_body(cfg, ctx):
  return _remat(cfg, lambda x, p, kc, vc: layer_fn(cfg, x, p, kc, vc, ctx))


def _run_layers(cfg, x, params, cache, ctx):
  """Runs ``layer_fn`` over the layers; returns (x, (k, v) or None).

  Stacked ``params`` run as one ``lax.scan`` (compile time independent of
  depth). With a stacked cache each layer returns its updated cache slice
  and the T new slots are written into [L, B, K, S, H] after the scan (a
  copy of the cache per call: fine for prefill, slow for decode).

  Per-layer ``params`` (a list, ``unstack_layers``) need an unstacked cache
  (or none) and run as an unrolled loop: each layer writes its new keys into
  its own buffer in place and attends to that buffer, so a decode step reads
  the cache once and copies nothing.
  """
  body = _layer_body(cfg, ctx)
  if isinstance(params, (list, tuple)):
    return _run_unrolled(body, x, params, cache)

  if cache is None:

    def step(x, p):
      x, _, _ = body(x, p, None, None)
      return x, None

    x, _ = jax.lax.scan(step, x, params)
    return x, None
  if not cache.is_stacked:
    raise ValueError("an unstacked KVCache needs per-layer params")

  t = x.shape[1]

  def step_cached(x, inp):
    p, kc, vc = inp
    x, k, v = body(x, p, kc, vc)
    new = lambda a: jax.lax.dynamic_slice_in_dim(a, ctx["index"], t, axis=2)
    return x, (new(k), new(v))

  x, (k_new, v_new) = jax.lax.scan(step_cached, x, (params, cache.k, cache.v))
  idx = (0, 0, 0, ctx["index"], 0)
  k_all = jax.lax.dynamic_update_slice(cache.k, k_new, idx)
  v_all = jax.lax.dynamic_update_slice(cache.v, v_new, idx)
  return x, (k_all, v_all)


def _run_unrolled(body, x, layers, cache):
  if cache is None:
    for p in layers:
      x, _, _ = body(x, p, None, None)
    return x, None
  if cache.is_stacked or len(cache.k) != len(layers):
    raise ValueError(
      "per-layer params need an unstacked KVCache (KVCache.unstacked()) "
      "with one buffer per layer"
    )
  ks, vs = [], []
  for p, kc, vc in zip(layers, cache.k, cache.v, strict=True):
    x, k, v = body(x, p, kc, vc)
    ks.append(k)
    vs.append(v)
  return x, (tuple(ks), tuple(vs))


# ---------------------------------------------------------------------------
# Construction with shardings


def logical_axes(state: nnx.State) -> Any:
  """The logical axes of every parameter in ``state`` (same tree)."""
  return jax.tree.map(
    lambda v: v.get_metadata("logical_axes"),
    state,
    is_leaf=lambda v: isinstance(v, nnx.Variable),
  )


def state_shardings(state: nnx.State, mesh, rules) -> Any:
  """NamedShardings for an (abstract) model state, by logical axes."""

  def one(v):
    spec = sharding.spec_for(
      v.get_metadata("logical_axes"), v.shape, mesh, rules
    )
    return jax.sharding.NamedSharding(mesh, spec)

  return jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def abstract_model(cfg: ModelConfig) -> Transformer:
  """A model of ShapeDtypeStructs: shapes and counts without allocation."""
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def param_count(cfg: ModelConfig) -> int:
  state = nnx.state(abstract_model(cfg), nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def init_model(cfg: ModelConfig, mesh, rules, seed: int = 0) -> Transformer:
  """Random init, every parameter created directly in its sharding."""
  graphdef, abs_state = nnx.split(abstract_model(cfg))
  shardings = state_shardings(abs_state, mesh, rules)

  def make():
    return nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))[1]

  state = jax.jit(make, out_shardings=shardings)()
  return nnx.merge(graphdef, state)
