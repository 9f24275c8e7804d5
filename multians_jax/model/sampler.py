"""Jitted group sampling with a KV cache: P prompts × G completions each.

Shape letters: P prompts, G completions per prompt, B = P·G rows (row
``p·G + g``), T bucketed prompt length, L = ``max_new_tokens``, S = T + L
cache slots, V vocab.

Flow (one ``jax.jit`` per (P, G, T, settings)):
  1. prefill the P prompts once, logits only at the last prompt position;
  2. repeat each prompt's cache G times (no G prefills);
  3. decode in a ``lax.while_loop`` that stops when every row has emitted a
     stop token or L tokens are written. The cache lives inside the jitted
     computation as a loop carry in the decode layout (one buffer per layer,
     ``KVCache.for_decode``) with per-layer weights
     (``layers.unstack_layers``), so each step writes one slot per layer in
     place and copies neither the cache nor the weights (checked on the
     compiled HLO in the tests).

With ``cfg.slots`` = S < B (length-aware rollouts), steps 2–3 instead run
S slots: when a slot's row stops, the slot takes the next row, its prompt's
prefilled cache copied in (``_refilled``). Draws are keyed by (row, column)
(``uniforms``), so both loops sample the same rollout from the same key.

Why two loops. ``_refilled`` with S = B samples what ``_static`` samples
(tested), but each of its steps does more: rows sit at different columns,
so the cache, the key mask, the tokens and the log-probs are written by
per-row scatters, and each slot's uniform is the row-th entry of its own
column's B-vector (S·B draws a step, 262,144 at the paper's B = 512),
where the static loop writes one column with one dynamic-update-slice
each and draws B uniforms; it also starts by copying the prompt cache
into every slot. Measured on SmolLM2-135M (P = 8, G = 8, T = 128, 64
forced tokens, XLA:CPU, 2026-12-06, BENCHMARKS.md): the same rollout,
6.59 s against the static loop's 6.35 s (medians of 6 calls in fresh
processes, +4 %); on TPUs, where scatters serialise, the gap is expected
to be larger (not measured). The static loop is what a batch without
slots (or with S ≥ B) runs, and the refilling loop's reference in the
tests.

Prompt lengths are bucketed to powers of two (``prompt_bucket``), so the
number of compilations is bounded by the number of buckets.

Log-probs. ``logprobs[b, i]`` is the log-prob of the sampled token under
the distribution it was drawn from: softmax(logits / temperature) on the
top-k / top-p support, renormalised over the kept tokens (what
``loss.token_logprobs`` recomputes with ``support=cfg.support``, so the
importance ratio of the first update is 1, not the kept mass). With
``temperature == 0`` (greedy) they are taken at temperature 1 on the full
vocabulary.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from multians_jax import settings, sharding
from multians_jax.model import attention as attention_lib
from multians_jax.model import layers as layers_lib
from multians_jax.model import support as support_lib
from multians_jax.model import transformer as model_lib

# This module's settings (defined in the leaf settings.py).
SamplingConfig = settings.SamplingConfig


@struct.dataclass
class Rollout:
  """Sampled completions; rows ordered prompt-major (p·G + g), each prompt
  carried once: row p·G + g continues prompt p."""

  prompt_tokens: jax.Array  # int32 [P, T] (left-padded)
  prompt_mask: jax.Array  # bool [P, T]
  tokens: jax.Array  # int32 [B, L]
  logprobs: jax.Array  # float32 [B, L]
  mask: jax.Array  # bool [B, L]: completion tokens (stop token included)
  lengths: jax.Array  # int32 [B]
  truncated: jax.Array  # bool [B]: hit L without a stop token

  @property
  def group_size(self) -> int:
    """G: completions per prompt (B / P)."""
    b, p = self.tokens.shape[0], self.prompt_tokens.shape[0]
    if b % p:
      raise ValueError(f"{b} rows do not divide into {p} prompts")
    return b // p

  def row_prompts(self) -> tuple[jax.Array, jax.Array]:
    """(tokens, mask) [B, T]: each row's prompt (repeated G times)."""
    g = self.group_size
    rep = lambda x: x if g == 1 else jnp.repeat(x, g, axis=0)
    return rep(self.prompt_tokens), rep(self.prompt_mask)


def prompt_bucket(n: int, minimum: int = 16) -> int:
  """Smallest power of two ≥ max(n, minimum)."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def pad_to_bucket(tokens: np.ndarray, mask: np.ndarray, length: int, pad_id=0):
  """Left-pads [P, T] arrays to [P, length] (T ≤ length)."""
  p, t = tokens.shape
  if t > length:
    raise ValueError(f"prompt length {t} exceeds bucket {length}")
  out_t = np.full((p, length), pad_id, np.int32)
  out_m = np.zeros((p, length), bool)
  out_t[:, length - t :] = tokens
  out_m[:, length - t :] = mask
  return out_t, out_m


def _filter_logits(logits, cfg: SamplingConfig):
  """Temperature, then top-k / top-p (``support.support_mask``) on [B, V]
  float32 logits: dropped tokens get the lowest float."""
  scaled = logits / cfg.temperature
  if cfg.support.full:
    return scaled
  keep = support_lib.support_mask(scaled, cfg.support)
  return jnp.where(keep, scaled, jnp.finfo(jnp.float32).min)


def _categorical(u, logits, block: int = 256):
  """Exact draw from softmax(logits) [B, V] by a two-level inverse CDF.

  ``u`` [B, 1] holds one uniform in [0, 1) per row: it picks a block of
  ``block`` tokens by its cumulative mass, then a token inside it.
  ``jax.random.categorical`` draws B·V Gumbel variates instead: on CPU that
  is ~25x slower than the whole search and dominated each decode step at
  V = 49k. Rounding can never select a token of zero probability (the index
  is capped at the last positive one).
  """
  b, v = logits.shape
  nb = -(-v // block)
  lg = jnp.pad(logits, ((0, 0), (0, nb * block - v)), constant_values=-jnp.inf)
  p = jnp.exp(lg - jnp.max(lg, axis=-1, keepdims=True)).reshape(b, nb, block)
  sums = jnp.sum(p, axis=-1)  # [B, nb]
  csum = jnp.cumsum(sums, axis=-1)
  u = u * csum[:, -1:]
  j = jnp.minimum(jnp.sum(csum <= u, -1, keepdims=True), _last_positive(sums))
  below = jnp.take_along_axis(csum - sums, j, axis=-1)
  row = jnp.take_along_axis(p, j[:, :, None], axis=1)[:, 0]  # [B, block]
  i = jnp.sum(jnp.cumsum(row, axis=-1) <= u - below, -1, keepdims=True)
  return (j * block + jnp.minimum(i, _last_positive(row)))[:, 0]


def uniforms(key, column, rows, num_rows: int):
  """The uniform [R, 1] that draws output ``column`` of rollout ``rows``.

  Counter-based: the draw of (row, column) is the ``row``-th entry of
  ``uniform(fold_in(key, column), (num_rows,))``, whatever the order in
  which rows and columns are decoded, so a refilled run (rows in other
  slots, at other steps) draws exactly what the static batch draws.
  ``column`` and ``rows`` are int [R] (or a scalar column with all rows).
  """
  draw = lambda c: jax.random.uniform(jax.random.fold_in(key, c), (num_rows,))
  if jnp.ndim(column) == 0:
    return draw(column)[rows, None]
  return jax.vmap(lambda c, r: draw(c)[r])(column, rows)[:, None]


def _last_positive(x):
  """Index of the last positive entry along the last axis, [..., 1]."""
  idx = jnp.arange(x.shape[-1])
  return jnp.max(jnp.where(x > 0, idx, -1), axis=-1, keepdims=True)


def _choose(logits, u, cfg: SamplingConfig):
  """Samples [B] tokens and their log-probs (see module docstring); u [B, 1]
  are the rows' uniforms (``uniforms``)."""
  if cfg.temperature == 0:
    tok = jnp.argmax(logits, axis=-1)
    lp = jax.nn.log_softmax(logits, axis=-1)
  else:
    filtered = _filter_logits(logits, cfg)
    tok = _categorical(u, filtered)
    lp = jax.nn.log_softmax(filtered, axis=-1)  # of the truncated dist
  tok = tok.astype(jnp.int32)
  return tok, jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]


def _is_stop(tok, cfg: SamplingConfig):
  if not cfg.stop_ids:
    return jnp.zeros(tok.shape, bool)
  return jnp.isin(tok, jnp.asarray(cfg.stop_ids, jnp.int32))


def _repeat_cache(
  cache: model_lib.DecodeCache, g: int
) -> model_lib.DecodeCache:
  """A [P, ...] decode cache → each row repeated G times ([B, ...])."""
  rep = lambda xs: tuple(jnp.repeat(x, g, axis=0) for x in xs)
  return cache.replace(
    k=rep(cache.k), v=rep(cache.v), mask=jnp.repeat(cache.mask, g, axis=0)
  )


def _prefill(m, tokens, mask, cfg: SamplingConfig, slots: int):
  """The P prompts through the model once: their decode-layout cache with
  ``slots`` slots, the logits at their last token [P, V], and the position
  of their first completion token [P]."""
  p, _ = tokens.shape
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
  dtype = model_lib.DTYPES[cfg.cache_dtype]
  cache = model_lib.KVCache.zeros(m.cfg, p, slots, dtype)
  h, cache = m.hidden(tokens, positions, mask, cache.constrained())
  last = m.logits(h[:, -1])  # no logits for other prompt positions
  layout = attention_lib.decode_key_layout(m.cfg.attention)
  return cache.for_decode(layout), last, positions[:, -1] + 1


def _output(tokens, mask, out_tokens, logprobs, lengths, done) -> Rollout:
  steps = out_tokens.shape[1]
  comp_mask = jnp.arange(steps)[None, :] < lengths[:, None]
  return Rollout(
    prompt_tokens=tokens,
    prompt_mask=mask,
    tokens=out_tokens,
    logprobs=jnp.where(comp_mask, logprobs, 0.0),
    mask=comp_mask,
    lengths=lengths,
    truncated=~done,
  )


@struct.dataclass
class _Decode:
  """The static decode loop's state. B = P·G rows, L = max_new_tokens."""

  i: jax.Array  # int32 [], the output column written next
  cache: Any  # model.DecodeCache
  prev: jax.Array  # int32 [B], the token chosen last
  tokens: jax.Array  # int32 [B, L], pad after a row stops
  logprobs: jax.Array  # float32 [B, L], 0 after a row stops
  done: jax.Array  # bool [B], the row has emitted a stop token
  lengths: jax.Array  # int32 [B], tokens emitted (the stop token included)


def _static(m, layers, tokens, mask, key, cfg: SamplingConfig, g: int):
  """Every row in its own slot until the longest row ends."""
  p, t = tokens.shape
  b, steps = p * g, cfg.max_new_tokens
  rows = jnp.arange(b)
  cache, last, next_pos = _prefill(m, tokens, mask, cfg, t + steps)
  cache = _repeat_cache(cache, g).constrained()
  next_pos = jnp.repeat(next_pos, g)  # [B]
  u = uniforms(key, 0, rows, b)
  tok, lp = _choose(jnp.repeat(last, g, axis=0), u, cfg)
  init = _Decode(
    i=jnp.int32(1),
    cache=cache,
    prev=tok,
    tokens=jnp.full((b, steps), cfg.pad_id, jnp.int32).at[:, 0].set(tok),
    logprobs=jnp.zeros((b, steps), jnp.float32).at[:, 0].set(lp),
    done=_is_stop(tok, cfg),
    lengths=jnp.ones((b,), jnp.int32),
  )

  def body(s: _Decode) -> _Decode:
    pos = (next_pos + s.i - 1)[:, None]
    one = jnp.ones((b, 1), bool)
    h, cache = m.decode_hidden(layers, s.prev[:, None], pos, one, s.cache)
    tok, lp = _choose(m.logits(h[:, 0]), uniforms(key, s.i, rows, b), cfg)
    tok = jnp.where(s.done, cfg.pad_id, tok)
    lp = jnp.where(s.done, 0.0, lp)
    return _Decode(
      i=s.i + 1,
      cache=cache.constrained(),
      prev=tok,
      tokens=jax.lax.dynamic_update_index_in_dim(s.tokens, tok, s.i, 1),
      logprobs=jax.lax.dynamic_update_index_in_dim(s.logprobs, lp, s.i, 1),
      done=s.done | _is_stop(tok, cfg),
      lengths=s.lengths + (~s.done).astype(jnp.int32),
    )

  cond = lambda s: (s.i < steps) & ~jnp.all(s.done)
  out = jax.lax.while_loop(cond, body, init)
  return _output(tokens, mask, out.tokens, out.logprobs, out.lengths, out.done)


@struct.dataclass
class _Refill:
  """The refilling decode loop's state: ``cfg.slots`` = S slots work
  through the B = P·G rows of the rollout, prompt-major."""

  cache: Any  # model.DecodeCache: per-layer [S, K, T + L, H] buffers
  row: jax.Array  # int32 [S]: the rollout row in the slot (B = none yet)
  col: jax.Array  # int32 [S]: the output column of the slot's last token
  live: jax.Array  # bool [S]: the slot's row is still generating
  prev: jax.Array  # int32 [S]: the slot's last token
  next_row: jax.Array  # int32 []: the next row to start
  tokens: jax.Array  # int32 [B, L]
  logprobs: jax.Array  # float32 [B, L]
  done: jax.Array  # bool [B]: the row emitted a stop token
  lengths: jax.Array  # int32 [B]


def _copy_prompts(kv, prompt_kv, slots, prompts, count):
  """Per-layer [S, K, T + L, H] buffers: ``slots[i]`` ← the prefilled
  [K, T, H] of ``prompts[i]`` for i < count, in place (one
  dynamic-update-slice per layer, k and v, and refilled slot). Keys stored
  [S, K, H, T + L] take the prompt's [K, H, T] at the same origin."""

  def copy(i, kv):
    one = lambda c, pc: jax.lax.dynamic_update_slice(
      c, jax.lax.dynamic_slice_in_dim(pc, prompts[i], 1), (slots[i], 0, 0, 0)
    )
    return tuple(
      tuple(one(c, pc) for c, pc in zip(cs, ps, strict=True))
      for cs, ps in zip(kv, prompt_kv, strict=True)
    )

  return jax.lax.fori_loop(0, count, copy, kv)


def _start(s: _Refill, prompt, last, mask, key, cfg: SamplingConfig, g: int):
  """Free slots take the next rows: their prompt's cache is copied in and
  their first token drawn from the prompt's last logits."""
  b, steps = s.tokens.shape
  free = ~s.live
  new_row = s.next_row + jnp.cumsum(free) - 1
  take = free & (new_row < b)
  count = jnp.sum(take)
  rows = jnp.minimum(new_row, b - 1)
  src = rows // g  # the prompt of each slot's new row
  order = jnp.argsort(~take, stable=True)  # the taking slots first
  k, v = _copy_prompts(
    (s.cache.k, s.cache.v), (prompt.k, prompt.v), order, src[order], count
  )
  fresh = jnp.pad(mask[src], ((0, 0), (0, steps)))
  cache = s.cache.replace(
    k=k, v=v, mask=jnp.where(take[:, None], fresh, s.cache.mask)
  )
  tok, lp = _choose(last[src], uniforms(key, 0, rows, b), cfg)
  dest = jnp.where(take, new_row, b)  # b: dropped
  stop = _is_stop(tok, cfg)
  return s.replace(
    cache=cache.constrained(),
    row=jnp.where(take, new_row, s.row),
    col=jnp.where(take, 0, s.col),
    live=jnp.where(take, ~stop & (steps > 1), s.live),
    prev=jnp.where(take, tok, s.prev),
    next_row=s.next_row + count,
    tokens=s.tokens.at[dest, 0].set(tok, mode="drop"),
    logprobs=s.logprobs.at[dest, 0].set(lp, mode="drop"),
    done=s.done.at[dest].set(stop, mode="drop"),
    lengths=s.lengths.at[dest].set(1, mode="drop"),
  )


def _refilled(m, layers, tokens, mask, key, cfg: SamplingConfig, g: int):
  """Continuous batching inside the loop: S < B slots; when a slot's row
  stops, the slot starts the next row, with its prompt's prefilled keys
  and values copied in. Row r draws column c with the same uniform as in
  ``_static`` (``uniforms``), so every row's tokens and log-probs are those
  of the static batch; only the slots' compute follows the real lengths."""
  p, t = tokens.shape
  b, steps, n = p * g, cfg.max_new_tokens, cfg.slots
  prompt, last, next_pos = _prefill(m, tokens, mask, cfg, t)

  def body(s: _Refill) -> _Refill:
    # Refill before the step: the copies then update the carry in place.
    s = _start(s, prompt, last, mask, key, cfg, g)
    rows = jnp.minimum(s.row, b - 1)
    pos = next_pos[rows // g] + s.col
    cache = s.cache.replace(index=t + s.col)
    one = jnp.ones((n, 1), bool)
    h, cache = m.decode_hidden(
      layers, s.prev[:, None], pos[:, None], one, cache
    )
    c = s.col + 1
    tok, lp = _choose(m.logits(h[:, 0]), uniforms(key, c, rows, b), cfg)
    dest = jnp.where(s.live, s.row, b)
    stop = _is_stop(tok, cfg)
    return s.replace(
      cache=cache.constrained(),
      col=jnp.where(s.live, c, s.col),
      live=s.live & ~stop & (c + 1 < steps),
      prev=tok,
      tokens=s.tokens.at[dest, c].set(tok, mode="drop"),
      logprobs=s.logprobs.at[dest, c].set(lp, mode="drop"),
      done=s.done.at[dest].set(stop, mode="drop"),
      lengths=s.lengths.at[dest].set(c + 1, mode="drop"),
    )

  cache = model_lib.KVCache.zeros(m.cfg, n, t + steps, prompt.k[0].dtype)
  cache = cache.for_decode(prompt.key_layout)
  cache = cache.replace(index=jnp.full((n,), t, jnp.int32))
  init = _Refill(
    cache=cache.constrained(),
    row=jnp.full((n,), b, jnp.int32),
    col=jnp.zeros((n,), jnp.int32),
    live=jnp.zeros((n,), bool),
    prev=jnp.zeros((n,), jnp.int32),
    next_row=jnp.int32(0),
    tokens=jnp.full((b, steps), cfg.pad_id, jnp.int32),
    logprobs=jnp.zeros((b, steps), jnp.float32),
    done=jnp.zeros((b,), bool),
    lengths=jnp.zeros((b,), jnp.int32),
  )
  cond = lambda s: jnp.any(s.live) | (s.next_row < b)
  out = jax.lax.while_loop(cond, body, init)
  return _output(tokens, mask, out.tokens, out.logprobs, out.lengths, out.done)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "num_samples"))
def _sample(graphdef, state, tokens, mask, key, *, cfg, num_samples):
  dt = model_lib.DTYPES[nnx.merge(graphdef, state).cfg.dtype]
  # Matrices in the compute dtype once, before the decode loop: every layer
  # casts its matrices at use anyway (the same values), and a loop that
  # casts float32 master weights at each step reads (and, sharded, gathers)
  # twice the bytes per step. Vectors (norm scales) stay: norms use them in
  # float32.
  state = jax.tree.map(
    lambda x: (
      x.astype(dt)
      if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating)
      else x
    ),
    state,
  )
  m = nnx.merge(graphdef, state)
  # Decode layout: per-layer cache buffers and weights (model/cache.py).
  layers = layers_lib.unstack_layers(m.layers.arrays())
  if 0 < cfg.slots < tokens.shape[0] * num_samples:
    return _refilled(m, layers, tokens, mask, key, cfg, num_samples)
  return _static(m, layers, tokens, mask, key, cfg, num_samples)


def sample(
  model: model_lib.Transformer,
  tokens,
  mask,
  key: jax.Array,
  cfg: SamplingConfig,
  num_samples: int = 1,
  mesh=None,
  rules=sharding.SAMPLE_RULES,
) -> Rollout:
  """Samples ``num_samples`` completions for each left-padded prompt.

  Args:
    model: the policy (the trainer's object; its parameters are not copied).
    tokens: int [P, T] left-padded prompt ids; mask: bool [P, T] real tokens
      (explicit, never derived from a pad id). Padded here to the bucket.
    key: PRNG key. cfg: settings. mesh: shard rows over the batch axes.
  """
  tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
  if tokens.ndim != 2 or tokens.shape != mask.shape:
    raise ValueError(
      f"tokens {tokens.shape} and mask {mask.shape} must be [P, T]"
    )
  if not mask[:, -1].all():
    raise ValueError("prompts must be left-padded: last column all real tokens")
  t = tokens.shape[1]
  if cfg.min_prompt_bucket:
    t = prompt_bucket(t, cfg.min_prompt_bucket)
  if t + cfg.max_new_tokens > model.cfg.max_seq_len:
    raise ValueError(
      f"prompt bucket {t} + max_new_tokens {cfg.max_new_tokens} exceeds "
      f"the model's max_seq_len {model.cfg.max_seq_len}"
    )
  tokens, mask = pad_to_bucket(tokens, mask, t)
  graphdef, state = nnx.split(model)
  if mesh is None:
    return _sample(
      graphdef, state, tokens, mask, key, cfg=cfg, num_samples=num_samples
    )
  spec = sharding.named(("batch", None), tokens.shape, mesh, rules)
  tokens, mask = jax.device_put((tokens, mask), spec)
  with sharding.activate(mesh, rules):
    return _sample(
      graphdef, state, tokens, mask, key, cfg=cfg, num_samples=num_samples
    )


def compile_count() -> int:
  """Number of compiled variants of the sampler (for tests/telemetry)."""
  return _sample._cache_size()
