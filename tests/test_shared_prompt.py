"""Shared-prompt training path: each prompt runs once per group.

``model.hidden_shared`` / ``loss.shared_prompt_logprobs`` must equal the
plain forward on the concatenated [prompt | completion] rows, and the
update step with ``group_size = G`` must equal the one without, for every
micro-batch split (whole groups, or parts of groups) and on a sharded mesh.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from multians_jax import sharding
from multians_jax.model import sampler
from multians_jax.model import transformer as model
from multians_jax.rl import loss, update

P, G, T, L = 2, 4, 6, 5
CFGS = {
  "llama": model.ModelConfig("llama", 64, 32, 2, 4, 2, 8, 48),
  "qwen2": model.ModelConfig("qwen2", 64, 32, 2, 4, 1, 8, 48, qkv_bias=True),
  "qwen3": model.ModelConfig("qwen3", 64, 32, 2, 4, 4, 8, 48, qk_norm=True),
}


def _grouped_rollout(seed=0, p=P, g=G, vocab=64):
  """P prompts (ragged left padding) × G completions (ragged lengths)."""
  rng = np.random.default_rng(seed)
  prompts = rng.integers(3, vocab, (p, T))
  pmask = np.ones((p, T), bool)
  pmask[0, :3] = False  # prompt 0 is 3 tokens long
  prompts = prompts * pmask
  lengths = rng.integers(1, L + 1, p * g)
  comp = np.arange(L)[None] < lengths[:, None]
  rep = lambda x: jnp.asarray(np.repeat(x, g, axis=0))
  return sampler.Rollout(
    prompt_tokens=rep(prompts).astype(jnp.int32),
    prompt_mask=rep(pmask),
    tokens=jnp.asarray(rng.integers(3, vocab, (p * g, L)) * comp, jnp.int32),
    logprobs=jnp.asarray(-rng.uniform(2, 6, (p * g, L)) * comp, jnp.float32),
    mask=jnp.asarray(comp),
    lengths=jnp.asarray(lengths, jnp.int32),
    truncated=jnp.asarray(lengths == L),
  )


def _batch(seed=0):
  adv = np.random.default_rng(seed + 1).normal(size=P * G)
  return update.make_batch(_grouped_rollout(seed), jnp.asarray(adv, "float32"))


def _split(b, s):
  pre = lambda x: x[::s, :T]
  comp = lambda x: x[:, T:]
  return (pre(b.tokens), pre(b.positions), pre(b.mask)), (
    comp(b.tokens),
    comp(b.positions),
    comp(b.mask),
  )


@pytest.mark.parametrize("family", sorted(CFGS))
def test_hidden_shared_equals_concatenated_forward(family, one_device_mesh):
  m = model.init_model(CFGS[family], one_device_mesh, sharding.TRAIN_RULES)
  b = _batch()
  full, _ = m.hidden(b.tokens, b.positions, b.mask)
  pre, comp = _split(b, G)
  hp, h = m.hidden_shared(*pre, *comp)
  mask = np.asarray(b.mask)
  # Completion positions: every real token equals the plain forward.
  np.testing.assert_allclose(
    np.asarray(h)[mask[:, T:]], np.asarray(full[:, T:])[mask[:, T:]], atol=1e-5
  )
  # Prompt positions: the same for every row of the group.
  for i in range(P):
    real = mask[i * G, :T]
    for r in range(i * G, (i + 1) * G):
      np.testing.assert_allclose(
        np.asarray(hp[i])[real], np.asarray(full[r, :T])[real], atol=1e-5
      )


@pytest.mark.parametrize("s", [G, 2])
@pytest.mark.slow
def test_shared_logprobs_and_gradients_equal_plain(s, one_device_mesh):
  """s = G (whole groups) and s = 2 (each group split in two)."""
  m = model.init_model(CFGS["qwen3"], one_device_mesh, sharding.TRAIN_RULES)
  graphdef, params = nnx.split(m)
  b = _batch(seed=3)
  cm = b.comp_mask

  def plain(params):
    mm = nnx.merge(graphdef, params)
    lp, ent = loss.token_logprobs(
      mm, b.tokens, b.positions, b.mask, temperature=0.7, chunk=2,
      start=T - 1, return_entropy=True,
    )  # fmt: skip
    return jnp.sum(lp * cm), (lp, ent)

  def shared(params):
    mm = nnx.merge(graphdef, params)
    pre, comp = _split(b, s)
    lp, ent = loss.shared_prompt_logprobs(
      mm, *pre, *comp, temperature=0.7, chunk=2, return_entropy=True
    )
    return jnp.sum(lp * cm), (lp, ent)

  (v1, (lp1, e1)), g1 = jax.value_and_grad(plain, has_aux=True)(params)
  (v2, (lp2, e2)), g2 = jax.value_and_grad(shared, has_aux=True)(params)
  c = np.asarray(cm)
  np.testing.assert_allclose(np.asarray(lp2)[c], np.asarray(lp1)[c], atol=1e-5)
  np.testing.assert_allclose(np.asarray(e2)[c], np.asarray(e1)[c], atol=1e-5)
  np.testing.assert_allclose(float(v2), float(v1), rtol=1e-6)
  for a, bb in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
    np.testing.assert_allclose(np.asarray(bb), np.asarray(a), atol=1e-5)


def _update(mesh, micro, group, tx):
  m = model.init_model(CFGS["llama"], mesh, sharding.TRAIN_RULES, seed=1)
  batch = update.place_batch(_batch(seed=5), mesh)
  ucfg = update.UpdateConfig(
    loss=loss.LossConfig(loss_agg="seq_mean_token_mean", max_len_norm=L),
    micro_batches=micro,
    temperature=0.7,
    logprob_chunk=3,
    group_size=group,
  )
  state = update.init_state(m, tx)
  with sharding.activate(mesh, sharding.TRAIN_RULES):
    new, metrics = update.update_step(
      nnx.graphdef(m), state, batch, tx=tx, cfg=ucfg
    )
  flat = [np.asarray(x) for x in jax.tree.leaves(new.params)]
  return flat, jax.device_get(metrics)


@pytest.mark.parametrize("micro", [1, 2, 4])
@pytest.mark.slow
def test_update_with_shared_prompts_equals_plain(micro, one_device_mesh):
  """8 rows = 2 prompts × 4: micro-batches of 8, 4 (one group) and 2 rows
  (half a group) all give the plain update's gradient."""
  sgd = optax.sgd(1.0)  # new params = params − grad: compares gradients
  plain, m1 = _update(one_device_mesh, 1, 1, sgd)
  shared, m2 = _update(one_device_mesh, micro, G, sgd)
  for a, b in zip(plain, shared, strict=True):
    np.testing.assert_allclose(b, a, atol=1e-6)
  for k in ("loss", "grad_norm", "entropy", "clip_frac"):
    if k in m1:
      np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_sharded_shared_update_equals_single_device(one_device_mesh):
  # SGD(1): parameters move by the gradient (Adam's first step is ±lr for
  # any gradient, so it would turn 1e-9 rounding on a ~0 gradient into lr).
  tx = optax.sgd(1.0)
  single, ms = _update(one_device_mesh, 2, G, tx)
  sharded, mm = _update(sharding.make_mesh(2, 2, 2), 2, G, tx)
  for a, b in zip(single, sharded, strict=True):
    np.testing.assert_allclose(b, a, atol=1e-5)
  np.testing.assert_allclose(mm["loss"], ms["loss"], atol=1e-6)


def test_update_config_rejects_bad_group_size():
  with pytest.raises(ValueError, match="group_size"):
    update.UpdateConfig(group_size=0)
  with pytest.raises(ValueError, match="micro_batches"):
    update.UpdateConfig(micro_batches=0)
