"""One full RL step of ours: our side of ``tools/bench_ab.py rl``.

What a training step does (``loop._rl_step``), on one device: sample G
completions per prompt (the refilling sampler, ``sampler.slots`` = B / 2),
decode and score them with the set reward (Multi-RLCR, K = 3), take the
group advantages and run the update (the completion axis cut to its
bucket, token-budget micro-batches by length). Natural lengths stop at
EOS; forced ones run to the cap. The budget is the decoder positions of
one of ``micro`` equal micro-batches at the cap, (P / micro) · (T + G · L):
at the cap the update runs ``micro`` micro-batches, as the reference does;
shorter completions make fewer, fuller ones.

The timed step starts from the same parameters and key as the warm-up step
(a copy of the initial state each time), so it samples the same rollout
and meets only compiled shapes.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from multians_jax import sharding, sources
from multians_jax.config import RunConfig
from multians_jax.data import pipeline
from multians_jax.rl import rollouts, update


def run_config(p: int, group: int, new_tokens: int, budget: int,
               temperature: float) -> RunConfig:  # fmt: skip
  return RunConfig.from_dict(
    dict(
      reward=dict(mode="multi_rlcr", num_answers=3),
      data=dict(prompts_per_step=p),
      sampler=dict(
        max_new_tokens=new_tokens,
        temperature=temperature,
        slots=p * group // 2,
      ),
      rl=dict(num_generations=group, micro_batch_tokens=budget),
      optim=dict(lr=1e-6),
    )
  )


def time_step(hf_dir: str, ids, mask, gold, *, group: int, new_tokens: int,
              micro: int, forced: bool, temperature: float):  # fmt: skip
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  model, _, tok = sources.load_model(hf_dir, mesh, sharding.TRAIN_RULES)
  p, t = ids.shape
  budget = p // micro * (t + group * new_tokens)
  run = run_config(p, group, new_tokens, budget, temperature)
  scfg = run.sampling_for(model.cfg, tok)
  if forced:
    scfg = dataclasses.replace(scfg, stop_ids=())
  batch = _batch(ids, mask, gold)
  tx = update.optimizer(run.optim_config)
  state0 = update.init_state(model, tx)
  graphdef = nnx.graphdef(model)

  def step():
    state = jax.block_until_ready(jax.tree.map(jnp.copy, state0))
    t0 = time.perf_counter()
    scored = rollouts.sample_and_score(
      run, model, batch, tok, scfg, jax.random.key(0), mesh
    )
    t1 = time.perf_counter()
    adv, _ = rollouts.advantages(run, scored, p)
    state, um = update.rl_update(
      graphdef, state, scored.rollout, adv, tx=tx, cfg=run.update_config,
      mesh=mesh,
    )  # fmt: skip
    jax.block_until_ready(state)
    return time.perf_counter() - t0, t1 - t0, scored, um

  first = time.perf_counter()
  step()  # compiles every shape the timed step meets
  first = time.perf_counter() - first
  step_s, sample_s, scored, um = step()
  adv, _ = rollouts.advantages(run, scored, p)
  packed = _packed(run)

  def timed(rollout, run=run):
    return _update_s(graphdef, state0, rollout, adv, run, tx, mesh)

  uniform = _uniform(scored.rollout)
  update_only_s, _ = timed(scored.rollout)
  uniform_s, uniform_um = timed(uniform)
  packed_s, packed_um = timed(scored.rollout, packed)
  packed_uniform_s, _ = timed(uniform, packed)
  equal_s, _ = timed(scored.rollout, _equal_split(run, micro))
  return dict(
    step_s=step_s,
    sample_s=sample_s,
    update_s=step_s - sample_s,
    compile_and_first_step_s=first,
    update_only_s=update_only_s,
    uniform_update_s=uniform_s,
    packed_update_s=packed_s,
    packed_uniform_update_s=packed_uniform_s,
    equal_split_update_s=equal_s,
    packed_positions=int(packed_um["update/positions"]),
    uniform_positions=int(uniform_um["update/positions"]),
    **_shape(scored, um, t, budget),
  )


def _packed(run):
  """``run`` with packed completions (``rl.pack_completions``)."""
  rl = dataclasses.replace(run.rl, pack_completions=True)
  return dataclasses.replace(run, rl=rl)


def _equal_split(run, micro: int):
  """``run`` with the update of before the token budget: ``micro`` equal
  micro-batches of the (trimmed) batch in one jitted step
  (``update.update_step``)."""
  rl = dataclasses.replace(run.rl, micro_batch_tokens=0, micro_batches=micro)
  return dataclasses.replace(run, rl=rl)


def _uniform(rollout):
  """The rollout with every row at the mean length (as near as whole
  tokens go): the same real tokens at uniform length."""
  n = int(round(float(jnp.mean(rollout.lengths))))
  cols = jnp.arange(rollout.tokens.shape[1])[None] < n
  return rollout.replace(
    mask=jnp.broadcast_to(cols, rollout.mask.shape),
    lengths=jnp.full_like(rollout.lengths, n),
    truncated=jnp.zeros_like(rollout.truncated),
  )


def _update_s(graphdef, state0, rollout, adv, run, tx, mesh):
  """(seconds, metrics) of a warm ``rl_update`` on ``rollout`` (the second
  of two)."""
  for _ in range(2):
    state = jax.block_until_ready(jax.tree.map(jnp.copy, state0))
    t0 = time.perf_counter()
    state, um = update.rl_update(
      graphdef, state, rollout, adv, tx=tx, cfg=run.update_config, mesh=mesh
    )
    jax.block_until_ready(state)
  return time.perf_counter() - t0, um


def _batch(ids, mask, gold) -> pipeline.PromptBatch:
  p = ids.shape[0]
  return pipeline.PromptBatch(
    tokens=np.asarray(ids, np.int32),
    mask=np.asarray(mask, bool),
    positions=np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32),
    gold=list(gold),
    tests=[""] * p,
    ids=list(range(p)),
  )


def _shape(scored, um, t, budget) -> dict:
  """What the step ran on: lengths, the update's width and micro-batches,
  and the decoder positions the update computed."""
  lengths = np.asarray(scored.rewards.lengths)
  return dict(
    decode_and_score_s=float(scored.seconds[1]),
    completion_tokens=int(lengths.sum()),
    mean_length=float(lengths.mean()),
    max_length=int(lengths.max()),
    update_width=int(um["update/width"]),
    micro_batches=int(um["update/micro_batches"]),
    budget=budget,
    prompt_bucket=t,
    decoder_positions=int(um["update/positions"]),
  )
