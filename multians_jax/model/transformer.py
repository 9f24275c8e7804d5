"""Decoder-only transformer (Llama / Qwen2 / Qwen3 families) in Flax NNX.

Shape letters: B batch, T query tokens, S key/cache slots, D model dim,
N query heads, K key/value heads, G = N // K query heads per KV head,
H head dim, F MLP hidden dim, V vocab, L layers.

Layer parameters are stacked on a leading ``L`` axis and the decoder runs as
one ``jax.lax.scan``: compile time does not grow with depth (SmolLM2's 30
layers compile as fast as 2). The layer itself, as pure functions of arrays,
is in ``layers.py``; here are its configuration, parameters and cache.

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
from multians_jax.model import attention as attention_lib
from multians_jax.model import layers as L
from multians_jax.model.layers import DTYPES

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
  attention: str = "xla"  # xla | cudnn | splash (attention.py)
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
    attention_lib.check(self.attention)
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


_QWEN_IDS = dict(bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
_LLAMA3 = dict(
  family="llama", vocab_size=128256, d_model=4096, num_layers=32,
  num_heads=32, num_kv_heads=8, head_dim=128, d_ff=14336, rope_theta=5e5,
  norm_eps=1e-5, bos_token_id=128000,
)  # fmt: skip
# Named architectures: shapes and token ids of models we know, for sizing a
# model without its files (tools/memory.py, model.arch_name).
ARCHS: dict[str, ModelConfig] = {
  "smollm2_135m": ModelConfig(
    family="llama", vocab_size=49152, d_model=576, num_layers=30,
    num_heads=9, num_kv_heads=3, head_dim=64, d_ff=1536, rope_theta=1e5,
    norm_eps=1e-5, tie_embeddings=True, max_seq_len=8192,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
  ),
  "qwen3_0_6b": ModelConfig(
    family="qwen3", vocab_size=151936, d_model=1024, num_layers=28,
    num_heads=16, num_kv_heads=8, head_dim=128, d_ff=3072, rope_theta=1e6,
    tie_embeddings=True, qk_norm=True, max_seq_len=40960, **_QWEN_IDS,
  ),
  "qwen3_1_7b": ModelConfig(
    family="qwen3", vocab_size=151936, d_model=2048, num_layers=28,
    num_heads=16, num_kv_heads=8, head_dim=128, d_ff=6144, rope_theta=1e6,
    tie_embeddings=True, qk_norm=True, max_seq_len=40960, **_QWEN_IDS,
  ),
  "qwen3_8b": ModelConfig(
    family="qwen3", vocab_size=151936, d_model=4096, num_layers=36,
    num_heads=32, num_kv_heads=8, head_dim=128, d_ff=12288, rope_theta=1e6,
    qk_norm=True, max_seq_len=40960, **_QWEN_IDS,
  ),
  "qwen2_5_7b": ModelConfig(
    family="qwen2", vocab_size=152064, d_model=3584, num_layers=28,
    num_heads=28, num_kv_heads=4, head_dim=128, d_ff=18944, rope_theta=1e6,
    qkv_bias=True, max_seq_len=32768, **_QWEN_IDS,
  ),
  "llama3_8b": ModelConfig(
    **_LLAMA3, max_seq_len=8192, eos_token_id=128001
  ),
  "llama3_1_8b": ModelConfig(
    **_LLAMA3, rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0, rope_original_max_pos=8192,
    max_seq_len=131072, eos_token_id=(128001, 128008, 128009),
  ),
}  # fmt: skip


def named_arch(name: str, **overrides) -> ModelConfig:
  """``ARCHS[name]`` with ``overrides`` (dtypes, remat, LoRA, ...)."""
  if name not in ARCHS:
    raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHS)}")
  return ARCHS[name].replace(**overrides)


# ---------------------------------------------------------------------------
# KV cache


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
    or ``layers.unstack_layers`` of it (a list of per-layer dicts, run as
    an unrolled loop with an unstacked cache: the sampler's decode step).
    """
    cfg = self.cfg
    dt = DTYPES[cfg.dtype]
    t = tokens.shape[1]
    x = self.embed[...].astype(dt)[tokens]
    x = sharding.constrain(x, ("batch", None, "act_embed"))
    if cache is None:
      key_mask, offset = mask, jnp.int32(0)
    elif cache.index.ndim == 1:  # per-row slots (the refilling sampler)
      if t != 1:
        raise ValueError("a per-row cache index takes one token per row")
      rows = jnp.arange(tokens.shape[0])
      key_mask = cache.mask.at[rows, cache.index].set(mask[:, 0])
      offset = cache.index
    else:
      key_mask = jax.lax.dynamic_update_slice(
        cache.mask, mask, (0, cache.index)
      )
      offset = cache.index
    q_slot = offset[..., None] + jnp.arange(t)  # [T] or [B, T]
    k_slot = jnp.arange(key_mask.shape[1])
    allowed = key_mask[:, None, :] & (k_slot <= q_slot[..., None])
    ctx = L.LayerContext(
      positions=positions,
      allowed=allowed,
      index=offset,
      inv_freq=L.rope_inv_freq(cfg),
      mask=mask,
      cache_mask=None if cache is None else cache.mask,
      key_layout="sh" if cache is None else cache.key_layout,
    )
    x, new_kv = L.run_layers(cfg, x, layers, cache, ctx)
    x = L.rms_norm(x, self.final_norm[...], cfg.norm_eps)
    if cache is not None:
      cache = cache.replace(
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
    ctx = L.SharedContext(
      prefix_positions=prefix_positions,
      prefix_allowed=prefix_mask[:, None, :] & causal(t),
      prefix_mask=prefix_mask,
      positions=positions,
      allowed=mask[:, None, :] & causal(n),
      inv_freq=L.rope_inv_freq(cfg),
      mask=mask,
    )
    body = L.remat(cfg, lambda xs, lp: L.shared_layer_fn(cfg, xs, lp, ctx))
    (xp, x), _ = jax.lax.scan(
      lambda xs, lp: (body(xs, lp), None), (xp, x), self.layers.arrays()
    )
    norm = lambda h: L.rms_norm(h, self.final_norm[...], cfg.norm_eps)
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
