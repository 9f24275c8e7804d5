"""Model: parity with transformers, cache consistency, shapes and counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tr
from hf_models import hf_logits, ragged_batch, tiny_hf, torch

from multians_jax import sharding
from multians_jax.interop import hf
from multians_jax.model import transformer as model

CASES = [
  # family, heads, kv, tied, theta, extra
  ("llama", 6, 6, False, 1e4, {}),  # MHA
  ("llama", 6, 2, True, 5e5, {}),  # GQA, tied
  ("llama", 4, 1, False, 1e5, {}),  # MQA
  ("qwen2", 6, 2, False, 1e6, {}),  # qkv biases
  ("qwen2", 4, 1, True, 1e4, {}),
  ("qwen3", 6, 3, False, 1e6, {}),  # q/k norm
  ("qwen3", 4, 4, True, 1e5, {}),
]


def _ours(hf_model, tmp_path, mesh):
  hf_model.save_pretrained(tmp_path)
  m, cfg, _ = hf.load(str(tmp_path), mesh, sharding.TRAIN_RULES)
  return m, cfg


@pytest.mark.parametrize("family,heads,kv,tied,theta,extra", CASES)
def test_parity_with_transformers(
  family, heads, kv, tied, theta, extra, tmp_path, one_device_mesh
):
  ref = tiny_hf(family, heads=heads, kv=kv, tied=tied, theta=theta, **extra)
  ours, cfg = _ours(ref, tmp_path, one_device_mesh)
  assert cfg.tie_embeddings == tied and cfg.rope_theta == theta
  ids, mask, pos = ragged_batch(101, [9, 4, 1, 7], 9)
  want = hf_logits(ref, ids, mask, pos)
  got, _ = ours(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
  assert np.abs(np.asarray(got) - want)[mask].max() <= 1e-4


def test_parity_llama3_rope_scaling(tmp_path, one_device_mesh):
  scaling = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
  }
  ref = tiny_hf(
    "llama",
    head_dim=32,
    heads=2,
    kv=1,
    hidden=64,
    theta=5e5,
    rope_scaling=scaling,
  )
  ours, cfg = _ours(ref, tmp_path, one_device_mesh)
  assert cfg.rope_type == "llama3"
  ids, mask, _ = ragged_batch(101, [6, 3], 6)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0) + 100  # past the low-freq band
  want = hf_logits(ref, ids, mask, pos)
  got, _ = ours(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
  assert np.abs(np.asarray(got) - want)[mask].max() <= 1e-4


def test_cached_decode_equals_full_forward(tmp_path, one_device_mesh):
  ref = tiny_hf("qwen3", heads=4, kv=2)
  ours, cfg = _ours(ref, tmp_path, one_device_mesh)
  ids, mask, pos = ragged_batch(101, [5, 2, 8], 8, seed=1)
  full, _ = ours(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
  # Prefill the first 5 columns, then decode one column at a time.
  cache = model.KVCache.zeros(cfg, 3, 16)
  out, cache = ours(
    jnp.asarray(ids[:, :5]),
    jnp.asarray(pos[:, :5]),
    jnp.asarray(mask[:, :5]),
    cache,
  )
  steps = [out]
  for t in range(5, 8):
    o, cache = ours(
      jnp.asarray(ids[:, t : t + 1]),
      jnp.asarray(pos[:, t : t + 1]),
      jnp.asarray(mask[:, t : t + 1]),
      cache,
    )
    steps.append(o)
  cached = np.concatenate([np.asarray(s) for s in steps], axis=1)
  assert int(cache.index) == 8
  assert np.abs(cached - np.asarray(full))[mask].max() <= 1e-4


@pytest.mark.parametrize("per_row", [False, True])
def test_decode_key_layouts_agree(tmp_path, one_device_mesh, per_row):
  """The decode layout (per-layer buffers, unrolled layers) gives the full
  forward's hidden states with keys stored [B,K,S,H] and [B,K,H,S], with
  one write slot for all rows and one per row; the "hs" buffers are the
  "sh" ones transposed."""
  from multians_jax.model import layers

  ref = tiny_hf("qwen3", heads=4, kv=2)
  ours, cfg = _ours(ref, tmp_path, one_device_mesh)
  ids, mask, pos = ragged_batch(101, [5, 2, 8], 8, seed=1)
  full, _ = ours.hidden(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
  per_layer = layers.unstack_layers(ours.layers.arrays())
  caches = {}
  for layout in model.KEY_LAYOUTS:
    cache = model.KVCache.zeros(cfg, 3, 16)
    _, cache = ours.hidden(
      jnp.asarray(ids[:, :5]), jnp.asarray(pos[:, :5]),
      jnp.asarray(mask[:, :5]), cache,
    )  # fmt: skip
    cache = cache.for_decode(layout)
    assert cache.key_layout == layout
    steps = []
    for t in range(5, 8):
      if per_row:
        cache = cache.replace(index=jnp.full((3,), t, jnp.int32))
      h, cache = ours.decode_hidden(
        per_layer, jnp.asarray(ids[:, t : t + 1]),
        jnp.asarray(pos[:, t : t + 1]), jnp.asarray(mask[:, t : t + 1]),
        cache,
      )  # fmt: skip
      steps.append(np.asarray(h))
    got = np.concatenate(steps, axis=1)
    want = np.asarray(full)[:, 5:8]
    assert np.abs(got - want)[mask[:, 5:8]].max() <= 1e-4
    caches[layout] = cache
  sh, hs = caches["sh"], caches["hs"]
  assert hs.k[0].shape == (3, 2, cfg.head_dim, 16)
  for a, b in zip(sh.k, hs.k, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b).swapaxes(2, 3))
  for a, b in zip(sh.v, hs.v, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_key_layout():
  cache = model.KVCache.zeros(model.named_arch("smollm2_135m"), 1, 4)
  with pytest.raises(ValueError, match="key_layout must be one of"):
    cache.for_decode("sk")


def test_bf16_compute_close_to_fp32(tmp_path, one_device_mesh):
  ref = tiny_hf("llama")
  ref.save_pretrained(tmp_path)
  m32, _, _ = hf.load(str(tmp_path), one_device_mesh, sharding.TRAIN_RULES)
  m16, cfg, _ = hf.load(
    str(tmp_path),
    one_device_mesh,
    sharding.TRAIN_RULES,
    param_dtype="bfloat16",
    dtype="bfloat16",
  )
  assert m16.embed[...].dtype == jnp.bfloat16
  ids, mask, pos = ragged_batch(101, [6, 6], 6)
  a, _ = m32(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
  b, _ = m16(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
  assert b.dtype == jnp.float32
  assert np.abs(np.asarray(a) - np.asarray(b)).max() < 0.05


@pytest.mark.parametrize("remat", ["full", "dots"])
@pytest.mark.slow
def test_remat_gives_same_gradient(remat, one_device_mesh):
  cfg = model.ModelConfig("llama", 64, 32, 3, 4, 2, 8, 48)
  ids, mask, pos = ragged_batch(64, [7, 3], 7)
  args = tuple(jnp.asarray(a) for a in (ids, pos, mask))

  def grads(c):
    m = model.init_model(c, one_device_mesh, sharding.TRAIN_RULES, seed=3)
    from flax import nnx

    def loss(m):
      lg, _ = m(*args)
      return jnp.sum(jax.nn.log_softmax(lg)[..., 0] * args[2])

    return jax.tree.leaves(nnx.grad(loss)(m))

  for x, y in zip(grads(cfg), grads(cfg.replace(remat=remat)), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


PUBLISHED = {
  "llama": ("llama3_8b", 8_030_261_248),
  "qwen3": ("qwen3_8b", 8_190_735_360),
  "qwen2": ("qwen2_5_7b", 7_615_616_512),
}


@pytest.mark.parametrize("family", sorted(PUBLISHED))
def test_presets_parameter_counts_without_memory(family):
  name, published = PUBLISHED[family]
  cfg = model.ARCHS[name]
  assert model.param_count(cfg) == published
  # And the same count as transformers' own model built on the meta device.
  hf_cfg = tr.AutoConfig.for_model(**hf.to_hf_config(cfg))
  with torch.device("meta"):
    ref = tr.AutoModelForCausalLM.from_config(hf_cfg)
  assert sum(p.numel() for p in ref.parameters()) == published


def test_preset_shapes_from_eval_shape():
  m = model.abstract_model(model.ARCHS["qwen3_8b"])
  assert m.layers.wq.shape == (36, 4096, 32, 128)
  from flax import nnx

  leaves = jax.tree.leaves(nnx.state(m, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match="num_kv_heads"):
    model.ModelConfig("llama", 10, 8, 1, 3, 2, 4, 8)
  with pytest.raises(ValueError, match="family"):
    model.ModelConfig("gpt2", 10, 8, 1, 2, 2, 4, 8)
  with pytest.raises(ValueError, match="unknown architecture 'nope'"):
    model.named_arch("nope")
