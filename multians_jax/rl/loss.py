"""Token log-probs and the clipped policy-gradient objective (METHOD §5).

Shape letters: B completions (rows, B = P·G), T tokens of a row (prompt and
completion), L completion tokens, D model dim, V vocab, C chunk of T.

``token_logprobs`` runs the decoder once and computes the LM head,
log-softmax and target gather chunk by chunk over T inside a ``lax.scan``
whose body has a hand-written VJP (``_chunk_logprobs``): the forward keeps
only the [B, C] log-normaliser of each chunk, the backward recomputes the
chunk's logits once and forms their cotangent in one elementwise pass, so
neither pass ever holds more than B·C·V logits.

The objective is split into a per-micro-batch **numerator**
(``pg_loss_terms``) and a whole-batch **denominator** (``loss_denominator``)
so that for any split of an optimizer batch into micro-batches
Σ_i numerator_i / denominator equals the full-batch loss, and gradient
accumulation of numerator_i / denominator is exact. With per-token loss ℓ,
counted-token mask m and N_seq the number of sequences with at least one
counted token:

- ``token_mean`` (reference ``dapo``): Σ ℓ·m / Σ m.
- ``seq_mean_token_mean`` (original GRPO): Σ_seq (Σ_t ℓ·m / Σ_t m) / N_seq.
- ``seq_mean_token_sum_norm`` (Dr.GRPO): Σ_seq (Σ_t ℓ·m / max_len_norm)
  / N_seq.

Per-token losses ℓ (``loss.kind``; ρ_t = π/π_old of token t, A its
advantage):

- ``ppo``: −min(ρ_t A, clip(ρ_t, 1−ε_low, 1+ε_high) A).
- ``gspo`` (GSPO-token, Zheng et al. 2025): the sequence ratio
  s = exp(mean_t log ρ_t) (over the row's counted tokens) replaces ρ_t as
  s_t = sg(s)·π_t/sg(π_t) (value s, gradient s·∇log π_t), clipped with its
  own range ``gspo_clip_low/high``; with one advantage per row it is GSPO's
  sequence objective. Needs ``seq_mean_token_mean`` (a mean over
  sequences).
- ``cispo`` (MiniMax-M1): −sg(clip(ρ_t, 1−ε_low, 1+ε_high))·A·log π_t: the
  importance weight is truncated and never drops a token's gradient.

Denominators are clamped at 1 so a batch with no counted token gives a loss
of 0, not NaN. Sequences with no counted token (all masked, or dropped by
``mask_truncated``) are left out of N_seq: they carry no gradient either.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from multians_jax import settings, sharding
from multians_jax.model.support import FULL, Support, support_mask

# This module's settings (defined in the leaf settings.py).
LOSS_AGGS = settings.LOSS_AGGS
LOSSES = settings.LOSSES
LossConfig = settings.LossConfig

DEFAULT_CHUNK = 128

# ---------------------------------------------------------------------------
# Token log-probabilities


def token_logprobs(
  model,
  tokens: jax.Array,
  positions: jax.Array,
  mask: jax.Array,
  *,
  temperature: float = 1.0,
  chunk: int = DEFAULT_CHUNK,
  start: int = 0,
  return_entropy: bool = False,
  support: Support = FULL,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """log π(tokens[:, t+1] | tokens[:, ≤t]) without [B, T, V] logits.

  The distribution is the sampler's: softmax(logits / temperature) on
  ``support`` (renormalised over the kept tokens; the target itself is
  always kept, so a log-prob is finite even where the support moved), so
  these values equal the sampler's log-probs (ρ = 1 at the first PPO
  iteration).

  Args:
    model: a ``model.Transformer`` (``hidden`` and ``head_weight``).
    tokens: int [B, T]. positions: int [B, T]. mask: bool [B, T] real tokens.
    temperature: sampling temperature (> 0).
    chunk: C, the number of positions whose [B, C, V] logits exist at once.
      Any C ≥ 1; T − 1 − start is padded up to a multiple of C internally.
    start: first position scored, to skip the prompt: the result covers the
      targets tokens[:, start+1:]. With prompts left-padded to width P and
      completions after them, ``start = P - 1`` gives exactly the [B, L]
      completion log-probs.
    return_entropy: also return the entropy of the same distribution.
    support: the sampler's top-k / top-p truncation.

  ``chunk``, ``start``, ``return_entropy`` and ``support`` are static
  under ``jit``;
  ``temperature`` may be static or an array.

  Returns:
    logp float32 [B, T−1−start] (column j scores tokens[:, start+j+1]);
    with ``return_entropy``, ``(logp, entropy)`` of the same shape. Values
    at padded targets are finite but meaningless: mask them.
  """
  t = tokens.shape[1]
  _check_head_args(temperature, chunk)
  if not 0 <= start < t - 1:
    raise ValueError(f"start must be in [0, T-1) = [0, {t - 1}): {start}")
  h, _ = model.hidden(tokens, positions, mask)
  h, targets = h[:, start:-1], tokens[:, start + 1 :]  # [B, n, D], [B, n]
  return head_logprobs(
    model, h, targets, temperature, chunk=chunk,
    return_entropy=return_entropy, support=support,
  )  # fmt: skip


def shared_prompt_logprobs(
  model,
  prompt_tokens: jax.Array,
  prompt_positions: jax.Array,
  prompt_mask: jax.Array,
  tokens: jax.Array,
  positions: jax.Array,
  mask: jax.Array,
  *,
  temperature: float = 1.0,
  chunk: int = DEFAULT_CHUNK,
  return_entropy: bool = False,
  support: Support = FULL,
  segments: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Completion log-probs of grouped rows, each prompt run once.

  Equals ``token_logprobs`` on the concatenated [prompt | completion] rows
  with ``start = T − 1`` (the [B, L] completion log-probs), computed with
  ``model.hidden_shared``: P·T + B·L tokens through the decoder instead of
  B·(T + L). The first completion token is scored from the prompt's last
  hidden state (prompts are left-padded, so that slot is always real).

  Args:
    prompt_tokens, prompt_positions, prompt_mask: [P, T].
    tokens, positions, mask: [B, L] completions, B = P·s, prompt-major.
    temperature, chunk, return_entropy, support: as in ``token_logprobs``.
    segments: int [B, L] for rows of several packed completions
      (``model.Transformer.hidden_shared``): each segment's first token is
      scored from the prompt's last hidden state, as a row's first is.
  """
  _check_head_args(temperature, chunk)  # before the decoder runs
  hp, h = model.hidden_shared(
    prompt_tokens, prompt_positions, prompt_mask, tokens, positions, mask,
    segments=segments,
  )  # fmt: skip
  s = tokens.shape[0] // prompt_tokens.shape[0]
  first = jnp.repeat(hp[:, -1:], s, axis=0)  # [B, 1, D]
  h = jnp.concatenate([first, h[:, :-1]], axis=1)  # h[:, j] predicts tok j
  if segments is not None:  # a segment's first token: the prompt's too
    starts = jnp.concatenate(
      [jnp.ones_like(segments[:, :1], bool),
       segments[:, 1:] != segments[:, :-1]], axis=1,
    )  # fmt: skip
    h = jnp.where(starts[..., None], first, h)
  return head_logprobs(
    model, h, tokens, temperature, chunk=chunk,
    return_entropy=return_entropy, support=support,
  )  # fmt: skip


def head_logprobs(
  model,
  h,
  targets,
  temperature,
  *,
  chunk=DEFAULT_CHUNK,
  return_entropy=False,
  support: Support = FULL,
):
  """LM head + log-softmax (on ``support``) + gather, chunked: h [B, n, D],
  targets [B, n] → logp [B, n] (and entropy), never holding more than
  [B, C, V] logits."""
  _check_head_args(temperature, chunk)
  b, n = targets.shape
  c = min(chunk, n)
  k = math.ceil(n / c)
  pad = k * c - n
  h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  h = h.reshape(b, k, c, -1).swapaxes(0, 1)  # [k, B, C, D]
  targets = targets.reshape(b, k, c).swapaxes(0, 1)  # [k, B, C]
  w = model.head_weight().astype(h.dtype)  # [D, V]
  temperature = jnp.asarray(temperature, jnp.float32)

  def body(carry, xs):
    return carry, _chunk_logprobs(w, *xs, temperature, return_entropy, support)

  _, (logp, ent) = jax.lax.scan(body, None, (h, targets))
  logp = logp.swapaxes(0, 1).reshape(b, k * c)[:, :n]
  if not return_entropy:
    return logp
  return logp, ent.swapaxes(0, 1).reshape(b, k * c)[:, :n]


def _check_head_args(temperature, chunk):
  if not isinstance(temperature, jax.Array) and not temperature > 0:
    raise ValueError(f"temperature must be > 0: {temperature}")
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1: {chunk}")


def _scaled_logits(w, h, temperature):
  """h [B, C, D] × w [D, V] → float32 logits / temperature [B, C, V], as one
  2-D matmul (``layers.linear``)."""
  b, c, d = h.shape
  z = jnp.matmul(
    h.reshape(b * c, d), w, preferred_element_type=jnp.float32
  ).reshape(b, c, -1)
  z = sharding.constrain(z, ("batch", None, "act_vocab"))
  return z / temperature


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunk_logprobs(w, h, targets, temperature, with_entropy, support):
  """h [B, C, D], targets [B, C] → (logp [B, C], entropy [B, C] or 0).

  logp = z_y − lse and entropy H = lse − Σ p·z of the distribution
  p = softmax(z) on the kept tokens (``_kept``), z = h·w / temperature.
  """
  return _chunk_fwd(w, h, targets, temperature, with_entropy, support)[0]


def _kept(z, targets, support):
  """The truncated support (plus each target), or None when it is full:
  the mask is a constant of the derivative (piecewise constant in z)."""
  if support.full:
    return None
  hit = jnp.arange(z.shape[-1]) == targets[..., None]
  return support_mask(jax.lax.stop_gradient(z), support) | hit


def _chunk_fwd(w, h, targets, temperature, with_entropy, support):
  z = _scaled_logits(w, h, temperature)
  keep = _kept(z, targets, support)
  m = jnp.max(z, axis=-1, keepdims=True)  # the top token is always kept
  e = jnp.exp(z - m)
  if keep is not None:
    e = jnp.where(keep, e, 0.0)
  s = jnp.sum(e, axis=-1)
  lse = m[..., 0] + jnp.log(s)
  picked = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
  if with_entropy:
    ent = lse - jnp.sum(e * z, axis=-1) / s
  else:
    ent = jnp.zeros((), jnp.float32)
  return (picked - lse, ent), (w, h, targets, temperature, lse, ent)


def _chunk_bwd(with_entropy, support, res, cot):
  """Recomputes z once; with p = exp(z − lse) and one-hot y:
  ∂logp/∂z = y − p and ∂H/∂z = −p·(z − lse + H), so
  dz = g_logp·(y − p) − g_H·p·(z − lse + H); then dh = dz·wᵀ / T,
  dw = hᵀ·dz / T and dT = −Σ dz·z / T (z already divided by T)."""
  w, h, targets, temperature, lse, ent = res
  g_logp, g_ent = cot
  z = _scaled_logits(w, h, temperature)
  p = jnp.exp(z - lse[..., None])
  keep = _kept(z, targets, support)
  if keep is not None:
    p = jnp.where(keep, p, 0.0)
  hit = jnp.arange(z.shape[-1]) == targets[..., None]
  dz = jnp.where(hit, g_logp[..., None], 0.0) - p * g_logp[..., None]
  if with_entropy:
    dz = dz - p * (z - lse[..., None] + ent[..., None]) * g_ent[..., None]
  d_temp = -jnp.sum(dz * z) / temperature
  b, c, d = h.shape
  dz2 = (dz / temperature).reshape(b * c, -1).astype(h.dtype)
  dh = jnp.matmul(dz2, w.T, preferred_element_type=jnp.float32)
  dw = jnp.matmul(
    h.reshape(b * c, d).T, dz2, preferred_element_type=jnp.float32
  )
  return (
    dw.astype(w.dtype),
    dh.reshape(b, c, d).astype(h.dtype),
    None,
    d_temp.astype(temperature.dtype),
  )


_chunk_logprobs.defvjp(_chunk_fwd, _chunk_bwd)


# ---------------------------------------------------------------------------
# Objective


def k3_kl(ref_logp: jax.Array, logp: jax.Array) -> jax.Array:
  """Schulman's k3 estimator of KL(π‖π_ref): e^d − d − 1, d = ref − logp."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


def per_token_loss(
  logp: jax.Array,
  old_logp: jax.Array,
  adv: jax.Array,
  cfg: LossConfig,
  ref_logp: jax.Array | None = None,
  mask: jax.Array | None = None,
) -> jax.Array:
  """ℓ [B, L] of ``cfg.kind`` (module docstring) (+ β·k3 if β > 0).

  ``old_logp``, ``ref_logp`` and ``adv`` [B] are constants (gradients are
  stopped); ``adv`` may also be per token [B, L] (``rl.credit='answer'``).
  ``mask`` (float [B, L], the counted tokens) is needed by ``gspo``.
  """
  old_logp, adv = jax.lax.stop_gradient((old_logp, adv))
  a = _per_token(adv)
  ratio, low, high = _ratio(logp, old_logp, cfg, mask)
  if cfg.kind == "cispo":
    weight = jax.lax.stop_gradient(jnp.clip(ratio, low, high))
    loss = -weight * a * logp
  else:
    loss = -jnp.minimum(ratio * a, jnp.clip(ratio, low, high) * a)
  if cfg.kl_beta > 0:
    if ref_logp is None:
      raise ValueError("loss.kl_beta > 0 needs ref_logp (reference log-probs)")
    loss = loss + cfg.kl_beta * k3_kl(jax.lax.stop_gradient(ref_logp), logp)
  return loss


def _ratio(logp, old_logp, cfg: LossConfig, mask):
  """(ratio [B, L], lower, upper clip bounds) of the loss kind."""
  if cfg.kind != "gspo":
    ratio = jnp.exp(logp - old_logp)
    return ratio, 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high
  if mask is None:
    raise ValueError("loss.kind='gspo' needs the token mask")
  m = mask.astype(jnp.float32)
  d = (logp - old_logp) * m
  seq = jnp.sum(d, axis=1, keepdims=True) / jnp.maximum(
    jnp.sum(m, axis=1, keepdims=True), 1.0
  )
  s = jnp.exp(jax.lax.stop_gradient(seq))
  ratio = s * jnp.exp(logp - jax.lax.stop_gradient(logp))
  return ratio, 1.0 - cfg.gspo_clip_low, 1.0 + cfg.gspo_clip_high


def _per_token(adv: jax.Array) -> jax.Array:
  """[B] (one advantage per completion) or [B, L] → broadcastable to [B, L]."""
  return adv[:, None] if adv.ndim == 1 else adv


def counted_mask(
  mask: jax.Array, cfg: LossConfig, truncated: jax.Array | None = None
) -> jax.Array:
  """float32 [B, L]: the completion tokens that enter the loss."""
  m = mask.astype(jnp.float32)
  if not cfg.mask_truncated:
    return m
  if truncated is None:
    raise ValueError("loss.mask_truncated=True needs the truncated flags [B]")
  if truncated.shape != mask.shape[:1]:
    raise ValueError(
      f"truncated must be [B] = {mask.shape[:1]}, got {truncated.shape}"
    )
  return m * (~truncated.astype(bool))[:, None].astype(jnp.float32)


def loss_denominator(
  mask: jax.Array, cfg: LossConfig, truncated: jax.Array | None = None
) -> jax.Array:
  """The divisor of the whole optimizer batch (mask [B, L], truncated [B]).

  ``token_mean``: counted tokens; the ``seq_mean_*`` kinds: counted
  sequences. Clamped at 1.
  """
  m = counted_mask(mask, cfg, truncated)
  if cfg.loss_agg == "token_mean":
    den = jnp.sum(m)
  else:
    den = jnp.sum((jnp.sum(m, axis=1) > 0).astype(jnp.float32))
  return jnp.maximum(den, 1.0)


def _numerator(loss: jax.Array, m: jax.Array, cfg: LossConfig) -> jax.Array:
  per_seq = jnp.sum(loss * m, axis=1)  # [B]
  if cfg.loss_agg == "token_mean":
    return jnp.sum(per_seq)
  if cfg.loss_agg == "seq_mean_token_mean":
    return jnp.sum(per_seq / jnp.maximum(jnp.sum(m, axis=1), 1.0))
  return jnp.sum(per_seq) / cfg.max_len_norm


def pg_loss_terms(
  logp: jax.Array,
  old_logp: jax.Array,
  adv: jax.Array,
  mask: jax.Array,
  cfg: LossConfig,
  *,
  ref_logp: jax.Array | None = None,
  truncated: jax.Array | None = None,
  entropy: jax.Array | None = None,
  entropy_coef=0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The loss numerator of one (micro-)batch and its metric sums.

  Args:
    logp: float [B, L] log-probs under the current policy (differentiated).
    old_logp: float [B, L] log-probs of the policy that sampled (π_old).
    adv: float [B] advantages, one per completion, or [B, L] per token.
    mask: bool [B, L] completion tokens.
    cfg: the loss settings.
    ref_logp: float [B, L] reference-policy log-probs; needed if β > 0, and
      when given the KL is reported even with β = 0.
    truncated: bool [B] completions cut by the length limit; needed with
      ``cfg.mask_truncated``.
    entropy: float [B, L] per-token entropies (differentiated) and
    entropy_coef: β_H (a float or traced scalar, ``entropy_coef``): the
      bonus −β_H · H_t joins each counted token's loss.

  Returns:
    ``(numerator, sums)``: numerator / ``loss_denominator`` of the whole
    batch is this micro-batch's share of the loss. ``sums`` are *sums over
    counted tokens* (so they add across micro-batches, ``combine_sums``;
    ``reduce_metrics`` turns them into means): ``tokens`` (count),
    ``ratio`` (ρ; GSPO: the sequence ratio s), ``clip_low`` (ρ < lower
    bound with A < 0: clipped below, no gradient; CISPO: weight truncated
    below, whatever A),
    ``clip_high`` (ρ > upper bound with A > 0; CISPO: truncated above),
    ``clip`` (either), ``kl`` (k3, only with ``ref_logp``), ``pg_loss``
    (the policy term alone) and ``logp_gap``'s ``token_ratio``,
    ``logp_diff`` and ``logp_diff_max`` (a maximum, not a sum).
  """
  _check_shapes(logp, old_logp, adv, mask, ref_logp)
  m = counted_mask(mask, cfg, truncated)
  loss = per_token_loss(logp, old_logp, adv, cfg, ref_logp, m)
  if entropy is not None and cfg.entropy_coef:
    loss = loss - entropy_coef * entropy
  sums = _metric_sums(logp, old_logp, adv, m, cfg, ref_logp)
  return _numerator(loss, m, cfg), sums


def entropy_coef(cfg: LossConfig, step) -> jax.Array:
  """β_H at optimizer step ``step`` (0-based; traced or not): the linear
  decay of ``cfg.entropy_decay_steps``, or constant."""
  return linear_decay(cfg.entropy_coef, cfg.entropy_decay_steps, step)


def linear_decay(beta: float, decay_steps: int, step) -> jax.Array:
  """``beta`` at step ``step`` (traced or not), falling linearly to 0 by
  step ``decay_steps``; constant when ``decay_steps`` is 0."""
  beta = jnp.asarray(beta, jnp.float32)
  if not decay_steps:
    return beta
  left = 1.0 - jnp.asarray(step, jnp.float32) / decay_steps
  return beta * jnp.clip(left, 0.0, 1.0)


def _metric_sums(logp, old_logp, adv, m, cfg, ref_logp):
  logp, old_logp, ref_logp = jax.lax.stop_gradient((logp, old_logp, ref_logp))
  ratio, lo, hi = _ratio(logp, old_logp, cfg, m)
  a = _per_token(adv)
  if cfg.kind == "cispo":  # truncated weights (the gradient is kept)
    low, high = ratio < lo, ratio > hi
  else:  # clipped with no gradient
    low, high = (ratio < lo) & (a < 0), (ratio > hi) & (a > 0)
  pg_cfg = dataclasses.replace(cfg, kl_beta=0.0)
  total = lambda x: jnp.sum(x.astype(jnp.float32) * m)
  sums = {
    "tokens": jnp.sum(m),
    "ratio": total(ratio),
    "clip_low": total(low),
    "clip_high": total(high),
    "clip": total(low | high),
    "pg_loss": total(per_token_loss(logp, old_logp, adv, pg_cfg, None, m)),
    **logp_gap(logp, old_logp, m),
  }
  if ref_logp is not None:
    sums["kl"] = total(k3_kl(ref_logp, logp))
  return sums


def logp_gap(logp, old_logp, m) -> dict[str, jax.Array]:
  """Sums over the counted tokens ``m`` of how far log π is from log π_old:
  ``token_ratio`` (exp of the difference, per token, whatever the loss),
  ``logp_diff`` (|difference|) and ``logp_diff_max`` (its maximum)."""
  d = jnp.where(m > 0, logp - old_logp, 0.0)
  return {
    "token_ratio": jnp.sum(jnp.where(m > 0, jnp.exp(d), 0.0)),
    "logp_diff": jnp.sum(jnp.abs(d)),
    "logp_diff_max": jnp.max(jnp.abs(d)),
  }


def combine_sums(a: dict, b: dict) -> dict:
  """Two micro-batches' metric sums as one: added, ``*_max`` by max."""
  return {
    k: jnp.maximum(a[k], b[k]) if k.endswith("_max") else a[k] + b[k] for k in a
  }


def reduce_metrics(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Token sums (added over micro-batches; ``*_max`` keys combined by
  max, ``combine_sums``) → per-token means.

  Keys: ``ratio_mean``, ``clip_low_frac``, ``clip_high_frac``,
  ``clip_frac``, ``pg_loss_token_mean``, ``kl_mean`` (if present),
  ``token_ratio_mean`` (= ``ratio_mean`` except under GSPO),
  ``logp_diff_mean`` and ``logp_diff_max`` (|log π − log π_old| per
  token: at the first iteration, the trainer against the sampler), and
  ``tokens`` (the count itself).
  """
  n = jnp.maximum(sums["tokens"], 1.0)
  names = {
    "token_ratio": "token_ratio_mean",
    "logp_diff": "logp_diff_mean",
    "ratio": "ratio_mean",
    "clip_low": "clip_low_frac",
    "clip_high": "clip_high_frac",
    "clip": "clip_frac",
    "pg_loss": "pg_loss_token_mean",
    "kl": "kl_mean",
  }
  out = {names[k]: v / n for k, v in sums.items() if k in names}
  out["tokens"] = sums["tokens"]
  out["logp_diff_max"] = sums["logp_diff_max"]
  return out


def _check_shapes(logp, old_logp, adv, mask, ref_logp):
  named = {"old_logp": old_logp, "mask": mask, "ref_logp": ref_logp}
  for name, x in named.items():
    if x is not None and x.shape != logp.shape:
      raise ValueError(
        f"{name} must have the shape of logp {logp.shape}, got {x.shape}"
      )
  if adv.shape not in (logp.shape[:1], logp.shape):
    raise ValueError(
      f"adv must be [B] = {logp.shape[:1]} or [B, L] = {logp.shape}, got "
      f"{adv.shape}"
    )
