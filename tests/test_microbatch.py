"""Token-budget micro-batches: the plan, and the update it drives equals the
padded full-batch update (loss and gradients) for every aggregation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from multians_jax import sharding
from multians_jax.config import RunConfig
from multians_jax.model import lora, sampler
from multians_jax.model import transformer as model
from multians_jax.rl import loss, microbatch, update

CFG = model.ModelConfig("llama", 64, 32, 2, 4, 2, 8, 48, qk_norm=False)


def _plan(lengths, **kw):
  kw = dict(group=2, prompt_len=8, budget=100, cap=64, minimum=4) | kw
  return microbatch.plan(np.asarray(lengths), **kw)


def test_plan_by_hand():
  """Groups of 2 (longest 30, 3, 12, 5, 2): buckets 32, 4, 16, 8, 4. At
  T = 8 and 100 positions a micro-batch holds 100 // (8 + 2·32) = 1 group
  at width 32, 100 // (8 + 2·16) = 2 at 16 (the 16- and the 8-wide group),
  100 // (8 + 2·4) = 6 at 4: the last two groups, 2 left → one of 2."""
  lengths = [30, 1, 3, 3, 12, 0, 5, 4, 2, 1]
  got = [(m.width, m.rows.tolist()) for m in _plan(lengths)]
  assert got == [
    (32, [0, 1]),
    (16, [4, 5, 6, 7]),
    (4, [2, 3, 8, 9]),
  ]
  # Left-overs go in powers of two: 3 groups of width 4 at room for 6 →
  # 2 + 1, no padding rows.
  got = _plan([3, 3, 2, 2, 1, 1])
  assert [m.rows.tolist() for m in got] == [[0, 1, 2, 3], [4, 5]]
  # A multiple of 2 groups (the batch axis' devices): a lone group is
  # padded with a row pair that counts for nothing.
  got = _plan([3, 3, 2, 2, 1, 1], multiple=2)
  assert [m.rows.tolist() for m in got] == [[0, 1, 2, 3], [4, 5, -1, -1]]
  # A group longer than the budget still runs, alone.
  assert [m.width for m in _plan([60, 1], budget=10)] == [64]
  with pytest.raises(ValueError, match="groups of 2"):
    _plan([1, 2, 3])


@settings(max_examples=60, deadline=None)
@given(
  st.lists(st.integers(0, 64), min_size=1, max_size=24),
  st.sampled_from([1, 2, 3]),
  st.integers(20, 400),
  st.sampled_from([1, 2, 4]),
)
def test_plan_properties(lengths, group, budget, multiple):
  size = -(-len(lengths) // group) * group  # whole groups
  lengths = np.resize(np.asarray(lengths), size)
  plan = _plan(lengths, group=group, budget=budget, multiple=multiple)
  rows = np.concatenate([m.rows for m in plan])
  real = np.sort(rows[rows >= 0])
  np.testing.assert_array_equal(real, np.arange(lengths.size))  # all, once
  shapes = {(m.rows.size, m.width) for m in plan}
  for m in plan:
    g = m.rows.size // group
    assert g % multiple == 0
    own = m.rows[m.rows >= 0]
    assert lengths[own].max() <= m.width  # nobody cut
    fit = microbatch.groups_fitting(budget, 8, group, m.width, multiple)
    assert g <= fit  # within the budget, or the fewest allowed
    assert g == fit or (g // multiple) & (g // multiple - 1) == 0  # 2^j
    pads = m.rows[m.rows < 0].size
    assert pads < multiple * group
  # longest first: widths never grow
  assert [m.width for m in plan] == sorted((m.width for m in plan), reverse=1)
  assert len(shapes) <= 5 * 8  # buckets 4..64, n(W) and powers of two


def _rollout(p=4, g=2, t=6, cap=40, seed=0):
  """Ragged groups: the longest completions 35, 3, 17 and 9 tokens."""
  rng = np.random.default_rng(seed)
  lengths = np.array([35, 20, 3, 1, 17, 2, 9, 9])[: p * g]
  comp = np.arange(cap)[None] < lengths[:, None]
  pmask = np.ones((p, t), bool)
  pmask[::2, :2] = False  # left padding on some prompts
  return sampler.Rollout(
    prompt_tokens=jnp.asarray(rng.integers(3, 64, (p, t)), jnp.int32),
    prompt_mask=jnp.asarray(pmask),
    tokens=jnp.asarray(rng.integers(3, 64, (p * g, cap)), jnp.int32),
    logprobs=jnp.asarray(-rng.uniform(2, 6, (p * g, cap)) * comp, "f4"),
    mask=jnp.asarray(comp),
    lengths=jnp.asarray(lengths, jnp.int32),
    truncated=jnp.asarray(lengths == 35),
  )


def _model(mesh, with_lora=False):
  m = model.init_model(CFG, mesh, sharding.TRAIN_RULES, seed=1)
  return lora.add(m, 2, 4.0, "wq,w_down", seed=3) if with_lora else m


def _updated(mesh, ucfg, budget, *, with_lora=False, p=4, pack=False,
             rollout=_rollout, **kw):  # fmt: skip
  """rl_update on ``rollout(p)`` (the ragged one): params after one step,
  metrics."""
  ucfg = dataclasses.replace(ucfg, pack=pack)
  m = _model(mesh, with_lora)
  sgd = optax.sgd(1.0)  # new params = params − grad: compares gradients
  rng = np.random.default_rng(5)
  adv = jnp.asarray(rng.normal(size=(p * 2, 40)), jnp.float32)
  cfg = dataclasses.replace(ucfg, micro_batch_tokens=budget)
  state = update.init_state(m, sgd)
  new, metrics = update.rl_update(
    nnx.graphdef(m), state, rollout(p), adv, tx=sgd, cfg=cfg, mesh=mesh, **kw
  )
  return [np.asarray(x) for x in jax.tree.leaves(new.params)], metrics


def _assert_same(a, b, atol=1e-6):
  (pa, ma), (pb, mb) = a, b
  for x, y in zip(pa, pb, strict=True):
    np.testing.assert_allclose(x, y, atol=atol)
  for k in ("loss", "tokens", "kl_mean", "entropy", "ratio_mean"):
    if k in ma:
      np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5, atol=atol)


def _perturbed(params):
  return jax.tree.map(lambda x: x * 0.9, params)


@pytest.mark.parametrize(
  "agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
)
@pytest.mark.slow
def test_budget_update_equals_padded_update(agg, one_device_mesh):
  """Per-token advantages, the KL term against a reference, truncation
  masked, a decaying entropy bonus, π_old recomputed (two iterations; the
  bonus read at each step's own β_H): the update over micro-batches
  by length (three widths here) equals the update of the whole batch at
  the sampler's cap."""
  ucfg = update.UpdateConfig(
    loss=loss.LossConfig(
      loss_agg=agg,
      max_len_norm=40,
      kl_beta=0.1,
      mask_truncated=True,
      entropy_coef=0.05,
      entropy_decay_steps=3,
    ),  # fmt: skip
    logprob_chunk=16,
    group_size=2,
    temperature=0.7,
  )
  kw = dict(num_iterations=2, ref_of=_perturbed)
  padded = _updated(one_device_mesh, ucfg, 0, **kw)
  budgeted = _updated(one_device_mesh, ucfg, 100, **kw)
  assert padded[1]["update/micro_batches"] == 1
  assert budgeted[1]["update/micro_batches"] == 3  # widths 64→40, 32, 16
  _assert_same(padded, budgeted)
  # Packed: each group's completions in one row (totals 55, 4, 19, 18 at
  # widths 64, 16, 24, 24): 100 positions hold 100 // (6 + 64) = 1 group
  # at 64, then 100 // (6 + 24) = 3 at 24 (the rest).
  packed = _updated(one_device_mesh, ucfg, 100, pack=True, **kw)
  assert packed[1]["update/micro_batches"] == 2
  _assert_same(padded, packed)
  whole = _updated(one_device_mesh, ucfg, 0, pack=True, **kw)
  assert whole[1]["update/micro_batches"] == 1
  _assert_same(padded, whole)


def test_equal_plan_runs_as_one_program():
  """A plan of M consecutive equal micro-batches at the batch's width (all
  rows at the cap: forced lengths) is ``update_step``'s M micro-batches;
  a plan by length is not."""
  forced = _plan(np.full(8, 64), budget=2 * (8 + 2 * 64))
  assert [m.width for m in forced] == [64, 64]  # 2 groups each
  assert microbatch.equal_split(forced, 8, 64) == 2
  assert (
    microbatch.equal_split(_plan([35, 20, 3, 1, 17, 2, 9, 9]), 8, 64) is None
  )
  assert microbatch.equal_split(None, 8, 64) is None


@pytest.mark.slow
def test_forced_lengths_update_as_one_program(one_device_mesh, monkeypatch):
  """Every completion at the cap: the token budget's plan runs as one
  program of equal micro-batches, with the planned path's result."""
  ucfg = update.UpdateConfig(logprob_chunk=16, group_size=2)
  full = lambda p: _rollout(p).replace(
    mask=jnp.ones((p * 2, 40), bool), lengths=jnp.full(p * 2, 40, jnp.int32)
  )
  one = _updated(one_device_mesh, ucfg, 2 * (6 + 2 * 40), rollout=full)
  assert one[1]["update/micro_batches"] == 2
  monkeypatch.setattr(microbatch, "equal_split", lambda *a: None)
  planned = _updated(one_device_mesh, ucfg, 2 * (6 + 2 * 40), rollout=full)
  assert planned[1]["update/micro_batches"] == 2
  _assert_same(one, planned)


@pytest.mark.slow
def test_budget_update_lora_sharded_and_per_row(one_device_mesh):
  """LoRA adapters; the plain per-row layout (G = 1 in the update); and a
  2×2×2 mesh (2 groups a micro-batch at least: 3 groups make a padded
  micro-batch) against one device."""
  ucfg = update.UpdateConfig(logprob_chunk=16, group_size=2)
  padded = _updated(one_device_mesh, ucfg, 0, with_lora=True)
  _assert_same(padded, _updated(one_device_mesh, ucfg, 60, with_lora=True))
  lora_packed = _updated(one_device_mesh, ucfg, 60, with_lora=True, pack=True)
  _assert_same(padded, lora_packed)
  per_row = dataclasses.replace(ucfg, group_size=1)
  _assert_same(
    _updated(one_device_mesh, per_row, 0),
    _updated(one_device_mesh, per_row, 30),
  )
  mesh = sharding.make_mesh(2, 2, 2)
  single = _updated(one_device_mesh, ucfg, 0, p=3)
  sharded = _updated(mesh, ucfg, 100, p=3)
  assert sharded[1]["update/micro_batches"] == 2  # 2 groups, 1 + padding
  _assert_same(single, sharded, atol=1e-5)
  # Packed on the mesh: one group a row, rows a multiple of the batch
  # axis' 4 devices: the 3 groups and an empty padding row, at width 64.
  packed = _updated(mesh, ucfg, 100, p=3, pack=True)
  assert packed[1]["update/micro_batches"] == 1
  _assert_same(single, packed, atol=1e-5)


def test_pack_by_hand():
  """Groups of 2 with extents (5, 0), (2, 3), (1, 1): totals 5, 5, 2 at
  packed widths 6, 6, 4 (the ladder from minimum 4: 4, 6, 8, 12, …). Each
  group's completions sit one after another in its row; ``dst`` finds each
  token again."""
  ext = np.array([5, 0, 2, 3, 1, 1])
  plan = microbatch.pack(ext, group=2, prompt_len=2, budget=20, cap=5,
                         minimum=4)  # fmt: skip
  # 20 // (2 + 6) = 2 groups at width 6, then the last alone at 4.
  assert [(m.width, m.rows.tolist()) for m in plan] == [
    (6, [0, 1, 2, 3]),
    (4, [4, 5]),
  ]
  src, dst = plan[0].src, plan[0].dst
  assert src[0].tolist() == [0, 1, 2, 3, 4, -1]  # row 0 · 5 + col
  assert src[1].tolist() == [10, 11, 15, 16, 17, -1]  # rows 2, 3
  assert dst[1].tolist() == [-1] * 5  # row 1: no tokens
  assert dst[3].tolist() == [6 + 2, 6 + 3, 6 + 4, -1, -1]
  # dst inverts src: each token's packed column names it back
  for m in plan:
    for r, cols in zip(m.rows, m.dst, strict=True):
      for c, at in enumerate(cols):
        if at >= 0:
          assert m.src.reshape(-1)[at] == r * 5 + c
  # A lone group on two devices' batch axis gets an empty padding row.
  last = microbatch.pack(ext, group=2, prompt_len=2, budget=20, cap=5,
                         minimum=4, multiple=2)[-1]  # fmt: skip
  assert last.rows.tolist() == [4, 5, -1, -1]
  assert (last.src[1] == -1).all() and (last.dst[2:] == -1).all()
  np.testing.assert_array_equal(
    microbatch.extents(np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])),
    [3, 0, 4],
  )
  with pytest.raises(ValueError, match="extents must lie in"):
    microbatch.pack([6, 1], group=2, prompt_len=2, budget=20, cap=5)


def test_config_takes_one_way_to_split():
  base = dict(rl=dict(micro_batch_tokens=4096))
  assert RunConfig.from_dict(base).update_config.micro_batch_tokens == 4096
  with pytest.raises(ValueError, match="rl.micro_batches=1"):
    RunConfig.from_dict(dict(rl=dict(micro_batch_tokens=64, micro_batches=2)))
  with pytest.raises(ValueError, match="micro_batch_tokens must be >= 0"):
    RunConfig.from_dict(dict(rl=dict(micro_batch_tokens=-1)))
  packed = RunConfig.from_dict(dict(rl=dict(pack_completions=True)))
  assert packed.update_config.pack
  with pytest.raises(ValueError, match="rl.micro_batches=1"):
    RunConfig.from_dict(dict(rl=dict(pack_completions=True, micro_batches=2)))
  with pytest.raises(ValueError, match="attention 'xla' or 'cudnn'"):
    RunConfig.from_dict(
      dict(rl=dict(pack_completions=True), model=dict(attention="splash"))
    )
