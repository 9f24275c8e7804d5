"""Train state, optimizer and the one jitted policy-gradient update step.

Shape letters: P prompts, G generations, B = P·G rows, T prompt bucket,
L completion tokens, S = T + L sequence, M micro-batches.

``update_step`` takes the whole optimizer batch, splits it into M
micro-batches and accumulates gradients of numerator_i / denominator (the
denominator is computed once on the whole batch, ``loss.loss_denominator``),
so the accumulated gradient equals the full-batch gradient exactly. A
non-finite loss or gradient leaves parameters and optimizer state unchanged
and counts the skip. The state is donated: updated in place on device.

The training loop itself lives in ``loop.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from multians_jax import hostmem, settings, sharding
from multians_jax.model import lora
from multians_jax.model import transformer as model_lib
from multians_jax.rl import loss, microbatch, packing

# This module's settings (defined in the leaf settings.py).
SCHEDULES = settings.SCHEDULES
OptimConfig = settings.OptimConfig
UpdateConfig = settings.UpdateConfig


def schedule(cfg: OptimConfig) -> optax.Schedule:
  decay_steps = max(1, cfg.total_steps - cfg.warmup_steps)
  if cfg.schedule == "constant":
    after = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "linear":
    after = optax.linear_schedule(cfg.lr, 0.0, decay_steps)
  else:
    after = optax.cosine_decay_schedule(cfg.lr, decay_steps)
  if not cfg.warmup_steps:
    return after
  warm = optax.linear_schedule(
    cfg.lr / cfg.warmup_steps, cfg.lr, cfg.warmup_steps - 1
  )
  return optax.join_schedules([warm, after], [cfg.warmup_steps])


def optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
  adamw = optax.adamw(
    schedule(cfg),
    b1=cfg.b1,
    b2=cfg.b2,
    eps=cfg.eps,
    weight_decay=cfg.weight_decay,
    mask=decay_mask,
  )
  if cfg.grad_clip:
    return optax.chain(clip_by_global_norm(cfg.grad_clip), adamw)
  return adamw


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """``optax.clip_by_global_norm`` (its state and direction) as one scale
  factor, which XLA fuses into the optimizer's elementwise update; optax's
  per-element select makes it materialise a second copy of the gradients.
  Clipped values may differ from optax's in the last bit."""

  def update_fn(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: nnx.State  # the policy's parameters (param_dtype)
  opt_state: optax.OptState  # of the trainable ones (``lora.partition``)
  skipped: jax.Array  # int32: consecutive non-finite updates


def init_state(model: model_lib.Transformer, tx) -> TrainState:
  """Fresh state; optimizer moments get their parameter's sharding. Under
  LoRA the optimizer holds the adapters alone."""
  params = nnx.state(model, nnx.Param)
  trainable, _ = lora.partition(params)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings(trainable, tx))(
    trainable
  )
  mesh = jax.tree.leaves(params)[0].sharding.mesh
  zero = jax.device_put(
    jnp.zeros((), jnp.int32),
    jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
  )
  return TrainState(zero, params, opt_state, zero + 0)


def opt_shardings(params, tx):
  """Shardings of ``tx.init(params)``: a leaf whose key path ends with a
  parameter's path (and has its shape) is sharded like it; others are
  replicated."""
  by_path = {}
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    by_path[_keys(path)] = x.sharding
  mesh = jax.tree.leaves(params)[0].sharding.mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def pick(path, leaf):
    keys = _keys(path)
    for n in range(len(keys)):
      sh = by_path.get(keys[n:])
      if sh is not None and len(sh.spec) <= leaf.ndim:
        return sh
    return replicated

  abstract = jax.eval_shape(tx.init, params)
  return jax.tree_util.tree_map_with_path(pick, abstract)


def _keys(path) -> tuple:
  return tuple(
    str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
    for k in path
  )


# ---------------------------------------------------------------------------
# Batches: rollout + advantages → the arrays the update step reads.


@struct.dataclass
class UpdateBatch:
  tokens: jax.Array  # int32 [B, S] prompt (left-padded) + completion
  positions: jax.Array  # int32 [B, S]
  mask: jax.Array  # bool [B, S] real tokens
  comp_mask: jax.Array  # bool [B, L]
  old_logp: jax.Array  # float32 [B, L]
  adv: jax.Array  # float32 [B], or [B, L] per token (rl.credit='answer')
  truncated: jax.Array  # bool [B]
  ref_logp: jax.Array | None = None  # float32 [B, L] when kl_beta > 0


def make_batch(rollout, adv: jax.Array) -> UpdateBatch:
  """Concatenates each row's prompt and completion of a ``sampler.Rollout``
  (its prompts repeated over their groups: [B, T + L]).

  ``adv``: one advantage per completion ([B], or [P, G] prompt-major), or
  one per completion token ([B, L], the rollout's mask shape).
  """
  prompt_tokens, prompt_mask = rollout.row_prompts()
  tokens = jnp.concatenate([prompt_tokens, rollout.tokens], axis=1)
  mask = jnp.concatenate([prompt_mask, rollout.mask], axis=1)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
  return UpdateBatch(
    tokens,
    positions,
    mask,
    rollout.mask,
    rollout.logprobs,
    adv if adv.shape == rollout.mask.shape else adv.reshape(-1),
    rollout.truncated,
  )


# The completion width of a batch (or micro-batch): a power-of-two bucket.
MIN_COMPLETION_BUCKET = microbatch.MIN_COMPLETION_BUCKET
completion_bucket = microbatch.completion_bucket


def trim_completions(rollout, adv, width: int):
  """The rollout's completion axis (and per-token advantages) cut to
  ``width`` columns. Exact when no completion is longer: the columns cut
  are masked out of every loss term, metric and count."""
  cut = lambda x: x[:, :width]
  rollout = rollout.replace(
    tokens=cut(rollout.tokens),
    logprobs=cut(rollout.logprobs),
    mask=cut(rollout.mask),
  )
  return rollout, cut(adv) if adv.ndim == 2 else adv


def _completion_logp(graphdef, params, b: UpdateBatch, cfg: UpdateConfig):
  m = nnx.merge(graphdef, params)
  rows, n = b.comp_mask.shape
  t = b.tokens.shape[1] - n  # prompt bucket
  # Consecutive rows sharing a prompt within these rows: groups of G cut
  # into micro-batches of ``rows`` leave runs of gcd(G, rows).
  s = math.gcd(cfg.group_size, rows)
  if s > 1:
    pre = lambda x: x[::s, :t]
    comp = lambda x: x[:, t:]
    return loss.shared_prompt_logprobs(
      m,
      pre(b.tokens),
      pre(b.positions),
      pre(b.mask),
      comp(b.tokens),
      comp(b.positions),
      comp(b.mask),
      temperature=cfg.temperature,
      chunk=cfg.logprob_chunk,
      return_entropy=True,
      support=cfg.support,
    )
  return loss.token_logprobs(
    m,
    b.tokens,
    b.positions,
    b.mask,
    temperature=cfg.temperature,
    chunk=cfg.logprob_chunk,
    start=t - 1,
    return_entropy=True,
    support=cfg.support,
  )


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def completion_logprobs(graphdef, params, batch: UpdateBatch, cfg):
  """log π(completion tokens) [B, L] (old / reference log-probs)."""
  return _completion_logp(graphdef, params, batch, cfg)[0]


def _split(x, m):
  return None if x is None else x.reshape((m, x.shape[0] // m) + x.shape[1:])


def _objective(graphdef, cfg, frozen, den, coef, train_params,
               mb: UpdateBatch, packed=None):  # fmt: skip
  """One micro-batch's share of the loss (numerator / whole-batch
  denominator) and its metric sums. ``coef``: the entropy bonus β_H now.
  ``packed``: the arguments of ``packing.logprobs`` after the model (the
  rows' packed form)."""
  params = lora.combine(train_params, frozen)
  if packed is None:
    logp, ent = _completion_logp(graphdef, params, mb, cfg)
  else:
    logp, ent = packing.logprobs(nnx.merge(graphdef, params), *packed, cfg)
  num, sums = loss.pg_loss_terms(
    logp,
    mb.old_logp,
    mb.adv,
    mb.comp_mask,
    cfg.loss,
    ref_logp=mb.ref_logp,
    truncated=mb.truncated,
    entropy=ent,
    entropy_coef=coef,
  )
  sums["entropy"] = jnp.sum(ent * mb.comp_mask)
  return num / den, sums


def _grad_fn(graphdef, cfg, frozen, den, coef):
  objective = functools.partial(_objective, graphdef, cfg, frozen, den, coef)
  return jax.value_and_grad(objective, has_aux=True)


@functools.partial(
  jax.jit, static_argnames=("graphdef", "tx", "cfg"), donate_argnums=(1,)
)
def update_step(graphdef, state: TrainState, batch: UpdateBatch, *, tx, cfg):
  """One optimizer step on the whole batch (micro-batched, exact).

  Gradients are taken with respect to the trainable parameters only (the
  adapters under LoRA; ``lora.partition``): the frozen ones enter as
  constants, so no gradient or moment buffer of their size exists.
  """
  den = loss.loss_denominator(batch.comp_mask, cfg.loss, batch.truncated)
  micro = jax.tree.map(lambda x: _split(x, cfg.micro_batches), batch)
  trainable, frozen = lora.partition(state.params)
  coef = loss.entropy_coef(cfg.loss, state.step)
  grad_fn = _grad_fn(graphdef, cfg, frozen, den, coef)

  def accumulate(carry, mb):
    g_acc, l_acc, s_acc = carry
    (lv, sums), g = grad_fn(trainable, mb)
    g_acc = jax.tree.map(jnp.add, g_acc, g)
    s_acc = loss.combine_sums(s_acc, sums)
    return (g_acc, l_acc + lv, s_acc), None

  first = jax.tree.map(lambda x: x[0], micro)
  (l0, s0), g0 = grad_fn(trainable, first)
  rest = jax.tree.map(lambda x: x[1:], micro)
  (grads, value, sums), _ = jax.lax.scan(accumulate, (g0, l0, s0), rest)
  return _apply(state, (grads, value, sums), tx)


def _apply(state: TrainState, acc, tx):
  """The optimizer step from accumulated (gradients, loss, metric sums);
  a non-finite loss or gradient leaves the state unchanged."""
  grads, value, sums = acc
  trainable, frozen = lora.partition(state.params)
  gnorm = optax.tree.norm(grads)
  finite = jnp.isfinite(value) & jnp.isfinite(gnorm)

  def step(s: TrainState) -> TrainState:
    updates, opt_state = tx.update(grads, s.opt_state, trainable)
    new = optax.apply_updates(trainable, updates)
    return s.replace(
      step=s.step + 1,
      params=lora.combine(new, frozen),
      opt_state=opt_state,
      skipped=jnp.zeros_like(s.skipped),
    )

  # A branch, not a select of new against old: the state updates in place.
  new_state = jax.lax.cond(
    finite, step, lambda s: s.replace(skipped=s.skipped + 1), state
  )
  metrics = loss.reduce_metrics(sums)
  metrics.update(
    loss=value,
    grad_norm=gnorm,
    update_skipped=(~finite).astype(jnp.float32),
    entropy=sums["entropy"] / jnp.maximum(sums["tokens"], 1.0),
  )
  return new_state, metrics


# ---------------------------------------------------------------------------
# Token-budget micro-batches (``microbatch.plan``): one jitted call a
# micro-batch, compiled once per (rows, width) shape, then one apply.


def _take(b: UpdateBatch, rows: jax.Array, width: int) -> UpdateBatch:
  """Rows ``rows`` of ``b``, completion columns cut to ``width``. A
  padding row (-1) is a copy of row 0 that counts for nothing (no counted
  token, not truncated, advantage 0): its forward pass is a real one."""
  valid = rows >= 0
  idx = jnp.maximum(rows, 0)
  t = b.tokens.shape[1] - b.comp_mask.shape[1]

  def take(x, cols=None):
    x = jnp.take(x, idx, axis=0)
    x = x if cols is None else x[:, :cols]
    return sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))

  comp = lambda x: None if x is None else take(x, width)
  adv = take(b.adv, width if b.adv.ndim == 2 else None)
  adv = jnp.where(valid.reshape((-1,) + (1,) * (adv.ndim - 1)), adv, 0.0)
  return UpdateBatch(
    tokens=take(b.tokens, t + width),
    positions=take(b.positions, t + width),
    mask=take(b.mask, t + width),
    comp_mask=comp(b.comp_mask) & valid[:, None],
    old_logp=comp(b.old_logp),
    adv=adv,
    truncated=take(b.truncated) & valid,
    ref_logp=comp(b.ref_logp),
  )


def _micro(batch, rows, src, dst, width):
  """A micro-batch's rows (``_take``) and, packed (``src`` / ``dst`` not
  None), the arguments of ``packing.logprobs``."""
  if src is None:
    return _take(batch, rows, width), None
  mb = _take(batch, rows, batch.comp_mask.shape[1])
  return mb, (batch.tokens, batch.positions, batch.mask, rows, src, dst)


@functools.partial(
  jax.jit, static_argnames=("graphdef", "cfg", "width"), donate_argnums=(1,)
)
def _accumulate(graphdef, acc, params, batch, rows, src, dst, den, step, *,
                width, cfg):  # fmt: skip
  trainable, frozen = lora.partition(params)
  mb, packed = _micro(batch, rows, src, dst, width)
  coef = loss.entropy_coef(cfg.loss, step)
  grad_fn = _grad_fn(graphdef, cfg, frozen, den, coef)
  (lv, sums), g = grad_fn(trainable, mb, packed)
  grads, value, total = acc
  return (
    jax.tree.map(jnp.add, grads, g),
    value + lv,
    loss.combine_sums(total, sums),
  )


@functools.partial(jax.jit, static_argnames=("tx",), donate_argnums=(0,))
def _apply_jit(state, acc, *, tx):
  return _apply(state, acc, tx)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _denominator(batch: UpdateBatch, cfg):
  return loss.loss_denominator(batch.comp_mask, cfg.loss, batch.truncated)


def _zero_acc(params, batch, cfg):
  """Zero gradients (sharded like the trainable parameters), loss and
  metric sums: the accumulator ``_accumulate`` adds into. The sums' keys
  follow the loss settings alone: traced on one token, not on the model."""

  def terms():
    z, one = jnp.zeros((1, 1)), jnp.ones((1, 1), bool)
    adv = z if batch.adv.ndim == 2 else jnp.zeros((1,))
    ref = None if batch.ref_logp is None else z
    num, sums = loss.pg_loss_terms(
      z, z, adv, one, cfg.loss, ref_logp=ref, truncated=jnp.zeros(1, bool)
    )
    return num, {**sums, "entropy": jnp.sum(z)}

  shapes = jax.eval_shape(terms)
  trainable, _ = lora.partition(params)
  grads = jax.jit(
    lambda t: jax.tree.map(jnp.zeros_like, t),
    out_shardings=jax.tree.map(lambda x: x.sharding, trainable),
  )(trainable)
  value, sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return grads, value, sums


def _arrays(mb: microbatch.Micro):
  """A ``Micro``'s index arrays on device (src / dst None unpacked)."""
  put = lambda x: None if x is None else jnp.asarray(x)
  return put(mb.rows), put(mb.src), put(mb.dst)


def planned_step(graphdef, state, batch, micro, *, tx, cfg):
  """``update_step`` over the token-budget micro-batches ``micro`` (a
  ``microbatch.plan``): the same loss and gradient, summed over
  micro-batches of their own widths (call under ``sharding.activate``)."""
  den = _denominator(batch, cfg)
  acc = _zero_acc(state.params, batch, cfg)
  for mb in micro:
    acc = _accumulate(
      graphdef, acc, state.params, batch, *_arrays(mb), den, state.step,
      width=mb.width, cfg=cfg,
    )  # fmt: skip
  return _apply_jit(state, acc, tx=tx)


@functools.partial(
  jax.jit, static_argnames=("graphdef", "cfg", "width"), donate_argnums=(1,)
)
def _micro_logprobs(graphdef, out, params, batch, rows, src, dst, *, width,
                    cfg):  # fmt: skip
  mb, packed = _micro(batch, rows, src, dst, width)
  if packed is None:
    logp = _completion_logp(graphdef, params, mb, cfg)[0]
  else:
    logp = packing.logprobs(nnx.merge(graphdef, params), *packed, cfg)[0]
  at = jnp.where(rows >= 0, rows, out.shape[0])  # padding rows: dropped
  return out.at[at, : logp.shape[1]].set(logp, mode="drop")


def planned_logprobs(graphdef, params, batch, micro, cfg):
  """``completion_logprobs`` computed micro-batch by micro-batch ([B, L];
  columns past a row's micro-batch width are 0, outside its mask)."""
  out = jnp.zeros_like(batch.old_logp)
  for mb in micro:
    out = _micro_logprobs(
      graphdef, out, params, batch, *_arrays(mb), width=mb.width, cfg=cfg
    )
  return out


def place_batch(batch, mesh, rules=sharding.TRAIN_RULES):
  """Shards every [B, ...] array of ``batch`` (an ``UpdateBatch`` or any
  pytree of row-major arrays, e.g. the warm-up's) over the batch axes."""

  def put(x):
    axes = ("batch",) + (None,) * (x.ndim - 1)
    return jax.device_put(x, sharding.named(axes, x.shape, mesh, rules))

  return jax.tree.map(put, batch)


def rl_update(graphdef, state, rollout, adv, *, tx, cfg: UpdateConfig, mesh,
              num_iterations: int = 1, ref_of=None):  # fmt: skip
  """The policy update on one rollout: ``num_iterations`` update steps
  under the mesh's sharding rules; returns (state, host metrics).

  With ``num_iterations`` > 1, π_old is recomputed as the trainer's own
  log-probs of the sampled tokens (exactly the policy that sampled);
  ``ref_of`` (params → reference params) adds the KL reference's
  log-probs. ``sampler/*`` metrics: the trainer's log-probs against the
  sampler's, before any update (the importance ratio, 1 on-policy).

  The update runs at the completion width of the longest completion's
  bucket (``completion_bucket``), not at the sampler's cap: its cost
  follows the tokens generated (``update/width`` is logged).
  """
  hostmem.release()  # the step's host garbage, before the update's temps
  cap = rollout.tokens.shape[1]
  width = completion_bucket(int(_longest(rollout.lengths)), cap)
  rollout, adv = trim_completions(rollout, jnp.asarray(adv), width)
  ub = place_batch(make_batch(rollout, adv), mesh)
  micro = plan_micro_batches(rollout, ub, cfg, mesh)
  if (m := microbatch.equal_split(micro, *ub.comp_mask.shape)) is not None:
    cfg = dataclasses.replace(cfg, micro_batches=m, micro_batch_tokens=0)
    micro = None
  if micro is None:
    logprobs = lambda params: completion_logprobs(graphdef, params, ub, cfg)
    step = functools.partial(update_step, graphdef, tx=tx, cfg=cfg)
  else:
    logprobs = lambda p: planned_logprobs(graphdef, p, ub, micro, cfg)
    step = lambda state, ub: planned_step(
      graphdef, state, ub, micro, tx=tx, cfg=cfg
    )
  gap = None
  with sharding.activate(mesh, sharding.TRAIN_RULES):
    if num_iterations > 1:  # π_old = the policy that sampled, exactly
      trainer = logprobs(state.params)
      sums = loss.logp_gap(trainer, ub.old_logp, ub.comp_mask)
      gap = loss.reduce_metrics({**sums, "tokens": jnp.sum(ub.comp_mask)})
      ub = ub.replace(old_logp=trainer)
    if ref_of is not None:
      ub = ub.replace(ref_logp=logprobs(ref_of(state.params)))
    for _ in range(num_iterations):
      state, um = step(state, ub)
      gap = um if gap is None else gap  # first iteration: π_old = sampler's
  um = {
    **um,
    "update/width": width,
    "update/micro_batches": cfg.micro_batches if micro is None else len(micro),
    "update/positions": positions(ub, micro, cfg),
    "sampler/ratio_mean": gap["token_ratio_mean"],
    "sampler/logp_diff_mean": gap["logp_diff_mean"],
    "sampler/logp_diff_max": gap["logp_diff_max"],
  }
  return state, jax.device_get(um)


def plan_micro_batches(rollout, ub: UpdateBatch, cfg: UpdateConfig, mesh):
  """The token-budget micro-batches of this batch (``microbatch.plan``),
  or None for ``update_step`` (M equal micro-batches): when
  ``cfg.micro_batch_tokens`` is 0, or the whole batch fits the budget.
  With ``cfg.pack`` the packed micro-batches (``microbatch.pack``)."""
  if not (cfg.micro_batch_tokens or cfg.pack):
    return None
  width = ub.comp_mask.shape[1]
  kw = dict(
    group=cfg.group_size,
    prompt_len=ub.tokens.shape[1] - width,
    budget=cfg.micro_batch_tokens,
    cap=width,
  )
  if cfg.pack:  # one group a row: the batch axis divides into groups
    extents = microbatch.extents(sharding.host_array(ub.comp_mask))
    multiple = microbatch.batch_multiple(mesh, sharding.TRAIN_RULES, 1)
    return microbatch.pack(extents, multiple=multiple, **kw)
  micro = microbatch.plan(
    sharding.host_array(rollout.lengths),
    multiple=microbatch.batch_multiple(
      mesh, sharding.TRAIN_RULES, cfg.group_size
    ),
    **kw,
  )
  if len(micro) == 1 and micro[0].rows.min() >= 0:
    return None  # the whole batch fits: ``update_step``, no accumulator
  return micro


def positions(ub: UpdateBatch, micro, cfg: UpdateConfig) -> int:
  """Decoder positions one pass of the update runs: prompts once per group
  (per row without sharing), completions at their micro-batch's width."""
  rows, width = ub.comp_mask.shape
  t = ub.tokens.shape[1] - width
  if micro is None:
    return rows // cfg.group_size * t + rows * width
  n = lambda m: m.rows.size // cfg.group_size  # groups
  if cfg.pack:
    return sum(n(m) * (t + m.width) for m in micro)
  return sum(n(m) * (t + cfg.group_size * m.width) for m in micro)


@jax.jit
def _longest(lengths):
  """max(lengths), replicated: readable on every process of a multi-host
  run, where the rollout's rows live on other processes too."""
  return jnp.max(lengths)
