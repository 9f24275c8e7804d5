"""Sharded forward and gradient on 8 fake CPU devices equal single-device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import ragged_batch
from jax.sharding import PartitionSpec as P

from multians_jax import sharding
from multians_jax.model import transformer as model

CFG = model.ModelConfig(
  "qwen3",
  64,
  32,
  2,
  4,
  2,
  8,
  64,
  qk_norm=True,
  qkv_bias=True,
  tie_embeddings=False,
)


def _loss_and_grad(m, ids, pos, mask):
  def loss(m):
    lg, _ = m(ids, pos, mask)
    lp = jax.nn.log_softmax(lg)
    tgt = jnp.roll(ids, -1, axis=1)
    ll = jnp.take_along_axis(lp, tgt[..., None], -1)[..., 0]
    return -(ll * mask).sum() / mask.sum(), lg

  (value, logits), grads = nnx.value_and_grad(loss, has_aux=True)(m)
  return value, logits, grads


def _run(mesh, rules):
  ids, mask, pos = ragged_batch(64, [8, 5, 3, 8, 1, 6, 7, 2], 8)
  batch = sharding.named(("batch", None), ids.shape, mesh, rules)
  args = [jax.device_put(jnp.asarray(a), batch) for a in (ids, pos, mask)]
  with sharding.activate(mesh, rules):
    m = model.init_model(CFG, mesh, rules, seed=7)
    fn = nnx.jit(_loss_and_grad)
    value, logits, grads = fn(m, *args)
  flat = [np.asarray(g) for g in jax.tree.leaves(grads)]
  specs = [x.sharding.spec for x in jax.tree.leaves(nnx.state(m, nnx.Param))]
  return float(value), np.asarray(logits), flat, specs


@pytest.fixture(scope="module")
def reference():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  return _run(mesh, sharding.TRAIN_RULES)


@pytest.mark.parametrize(
  "shape,rules",
  [
    ((2, 2, 2), "train"),
    ((1, 8, 1), "train"),
    ((1, 2, 4), "train"),
    ((4, 1, 2), "sample"),
    ((2, 2, 2), "sample"),
  ],
)
@pytest.mark.slow
def test_sharded_forward_and_grad_match_single_device(shape, rules, reference):
  assert len(jax.devices()) == 8
  mesh = sharding.make_mesh(*shape)
  value, logits, grads, specs = _run(mesh, sharding.RULE_SETS[rules])
  r_value, r_logits, r_grads, _ = reference
  assert any(s != P() for s in specs)
  np.testing.assert_allclose(value, r_value, atol=1e-5)
  np.testing.assert_allclose(logits, r_logits, atol=1e-5)
  for g, r in zip(grads, r_grads, strict=True):
    np.testing.assert_allclose(g, r, atol=1e-5)


def test_rules_fall_back_when_not_divisible():
  mesh = sharding.make_mesh(1, 2, 4)
  # 3 KV heads do not split 4 ways: replicated on that dim, fsdp kept.
  spec = sharding.spec_for(
    ("embed", "kv_heads", "head_dim"), (32, 3, 8), mesh, sharding.TRAIN_RULES
  )
  assert spec == P("fsdp", None, None)
  spec = sharding.spec_for(("batch", None), (6, 5), mesh, sharding.TRAIN_RULES)
  assert spec == P("fsdp", None)


def test_make_mesh_errors():
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.make_mesh(2, 3, 1)
  with pytest.raises(ValueError, match="at most one"):
    sharding.make_mesh(-1, -1, 1)
  with pytest.raises(ValueError, match="mesh.tensor"):
    sharding.make_mesh(1, -1, 0)
  assert sharding.make_mesh(2, -1, 2).shape == {
    "data": 2,
    "fsdp": 2,
    "tensor": 2,
  }
