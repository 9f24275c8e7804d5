"""Decoder-only transformer (Llama / Qwen2 / Qwen3 families) in Flax NNX.

Shape letters: B batch, T query tokens, S key/cache slots, D model dim,
N query heads, K key/value heads, R = N // K query heads per KV head,
H head dim, F MLP hidden dim, V vocab, L layers.

Layer parameters are stacked on a leading ``L`` axis and the decoder runs as
one ``jax.lax.scan``: compile time does not grow with depth (SmolLM2's 30
layers compile as fast as 2). The layer itself, as pure functions of arrays,
is in ``layers.py``, its configuration in ``config.py`` and its cache in
``cache.py``; here are its parameters and the forward.

One forward serves training (no cache), prefill and decode (cache): tokens
come with explicit ``positions`` (RoPE) and a ``mask`` of real tokens, so
left padding never relies on a pad id.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from multians_jax import sharding
from multians_jax.model import cache, config
from multians_jax.model import layers as L

# The model's public names, defined in leaf modules (config: validated
# without loading the model; cache: read by the layers).
CACHE_AXES = cache.CACHE_AXES
KEY_LAYOUTS = cache.KEY_LAYOUTS
DecodeCache = cache.DecodeCache
KVCache = cache.KVCache
ARCHS = config.ARCHS
DTYPES = config.DTYPES
FAMILIES = config.FAMILIES
HF_PROJ = config.HF_PROJ
IMPLS = config.IMPLS
LORA_TARGETS = config.LORA_TARGETS
REMAT = config.REMAT
ModelConfig = config.ModelConfig
check_lora = config.check_lora
lora_targets = config.lora_targets
named_arch = config.named_arch

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
    """Final-normed hidden states [B, T, D] and the updated cache: the
    layers as one scan over their stacked parameters.

    Args:
      tokens: int [B, T]. positions: int [B, T] (RoPE positions).
      mask: bool [B, T], True for real tokens (padding is never attended).
      cache: optional stacked KV cache; the T tokens go to slots
        index..index+T-1 and attend to every earlier valid slot.
    """
    x = self._embed(tokens)
    if cache is None:
      ctx = self._context(positions, mask, mask, jnp.int32(0), None, "sh")
      x, _ = L.run_layers(self.cfg, x, self.layers.arrays(), None, ctx)
      return self._norm(x), None
    key_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, cache.index))
    ctx = self._context(positions, mask, key_mask, cache.index, cache, "sh")
    x, (k, v) = L.run_layers(self.cfg, x, self.layers.arrays(), cache, ctx)
    t = tokens.shape[1]
    cache = cache.replace(k=k, v=v, mask=key_mask, index=cache.index + t)
    return self._norm(x), cache

  def decode_hidden(self, layers, tokens, positions, mask, cache: DecodeCache):
    """The decode step: ``hidden`` of T new tokens against a
    ``DecodeCache``, the layers unrolled over per-layer parameters
    (``layers.unstack_layers`` of ``self.layers.arrays()``). With a per-row
    cache index each row writes its own slot (T = 1)."""
    t = tokens.shape[1]
    x = self._embed(tokens)
    if cache.per_row:  # the refilling sampler's slots
      if t != 1:
        raise ValueError("a per-row cache index takes one token per row")
      rows = jnp.arange(tokens.shape[0])
      key_mask = cache.mask.at[rows, cache.index].set(mask[:, 0])
    else:
      key_mask = jax.lax.dynamic_update_slice(
        cache.mask, mask, (0, cache.index)
      )
    ctx = self._context(
      positions, mask, key_mask, cache.index, cache, cache.key_layout
    )
    x, (k, v) = L.run_decode_layers(self.cfg, x, layers, cache, ctx)
    cache = cache.replace(k=k, v=v, mask=key_mask, index=cache.index + t)
    return self._norm(x), cache

  def _embed(self, tokens):
    x = self.embed[...].astype(DTYPES[self.cfg.dtype])[tokens]
    return sharding.constrain(x, ("batch", None, "act_embed"))

  def _norm(self, x):
    return L.rms_norm(x, self.final_norm[...], self.cfg.norm_eps)

  def _context(self, positions, mask, key_mask, index, cache, key_layout):
    """The layers' ``LayerContext``: query t (at slot index + t, per row
    with a [B] index) attends to the valid slots up to its own."""
    t = mask.shape[1]
    q_slot = index[..., None] + jnp.arange(t)  # [T] or [B, T]
    k_slot = jnp.arange(key_mask.shape[1])
    return L.LayerContext(
      positions=positions,
      allowed=key_mask[:, None, :] & (k_slot <= q_slot[..., None]),
      index=index,
      inv_freq=L.rope_inv_freq(self.cfg),
      mask=mask,
      cache_mask=None if cache is None else cache.mask,
      key_layout=key_layout,
    )

  def hidden_shared(
    self,
    prefix_tokens,
    prefix_positions,
    prefix_mask,
    tokens,
    positions,
    mask,
    segments=None,
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
      segments: optional int [B, L]: a row holding several sequences that
        continue its prefix (packed completions, ``rl/packing.py``); a token
        sees its prefix and the earlier tokens of its own segment only.
        Needs ``model.attention`` ``xla`` or ``cudnn`` (splash's prefix mask
        has no per-segment form).

    Returns:
      (prefix hidden [P, T, D], row hidden [B, L, D]).
    """
    cfg = self.cfg
    dt = DTYPES[cfg.dtype]
    p, t = prefix_tokens.shape
    b, n = tokens.shape
    if b % p:
      raise ValueError(f"rows ({b}) must be a multiple of prefixes ({p})")
    allowed = mask[:, None, :] & causal_mask(n)
    if segments is not None:
      if cfg.attention == "splash":
        raise ValueError(
          "packed rows (segments) need model.attention 'xla' or 'cudnn': "
          "splash's shared-prefix mask has no per-segment form"
        )
      allowed &= segments[:, :, None] == segments[:, None, :]
    emb = self.embed[...].astype(dt)
    axes = ("batch", None, "act_embed")
    xp = sharding.constrain(emb[prefix_tokens], axes)
    x = sharding.constrain(emb[tokens], axes)
    ctx = L.SharedContext(
      prefix_positions=prefix_positions,
      prefix_allowed=prefix_mask[:, None, :] & causal_mask(t),
      prefix_mask=prefix_mask,
      positions=positions,
      allowed=allowed,
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


def causal_mask(m: int) -> jax.Array:
  """bool [1, m, m]: query i sees keys ≤ i."""
  return jnp.tril(jnp.ones((m, m), bool))[None]


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
