"""Attention backends (``model.attention``): ``cudnn`` (its XLA fallback
here) and ``splash`` (Pallas, interpret mode on CPU) equal the ``xla``
reference on every path: the training forward and its gradient (per row
and with shared prompts), a prefill into an empty and into a filled cache,
and decoding (static and refilled)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import ragged_batch

from multians_jax import sharding
from multians_jax.model import attention, sampler
from multians_jax.model import transformer as model

VOCAB = 97
# Splash in interpret mode is slow on CPU: the slow tier.
IMPLS = ["cudnn", pytest.param("splash", marks=pytest.mark.slow)]


def _model(impl, family="qwen3"):
  cfg = model.ModelConfig(
    family, VOCAB, 32, 2, 4, 2, 8, 64, tie_embeddings=family == "llama",
    qk_norm=family == "qwen3", max_seq_len=512, pad_token_id=0,
    attention=impl,
  )  # fmt: skip
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  return model.init_model(cfg, mesh, sharding.TRAIN_RULES, seed=1)


@pytest.fixture(scope="module")
def models():
  return {impl: _model(impl) for impl in attention.IMPLS}


def _close(got, want, atol=1e-5):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=atol)


def _close_grads(got, want):
  """Gradients: within 1e-5 of each leaf's largest entry (fp32 sums of
  different orders; shared prompts against the per-row layout differ as
  much under ``xla`` alone)."""

  def one(a, b):
    scale = max(1.0, float(np.abs(np.asarray(b)).max()))
    _close(a, b, 1e-5 * scale)

  jax.tree.map(one, got, want)


def _batch(seed=0):
  ids, mask, _ = ragged_batch(VOCAB, [9, 4, 12], 12, seed=seed)
  ids = np.concatenate([ids, np.full((3, 5), 3)], 1)  # completions …
  mask = np.concatenate([mask, np.arange(5)[None] < [[5], [2], [4]]], 1)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)  # … right-padded
  return jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask)


def _loss(m, ids, pos, mask):
  logits, _ = m(ids, pos, mask)
  lp = jax.nn.log_softmax(logits[:, :-1], -1)
  tok = jnp.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
  return jnp.sum(jnp.where(mask[:, 1:] & mask[:, :-1], tok, 0.0))


def _grads(m, fn, *args):
  graphdef, state = nnx.split(m)
  return jax.grad(lambda s: fn(nnx.merge(graphdef, s), *args))(state)


@pytest.mark.parametrize("impl", IMPLS)
def test_training_forward_and_gradient(models, impl):
  ids, pos, mask = _batch()
  ref, got = models["xla"], models[impl]
  want_logits, _ = ref(ids, pos, mask)
  logits, _ = got(ids, pos, mask)
  valid = np.asarray(mask)
  _close(np.asarray(logits)[valid], np.asarray(want_logits)[valid])
  want = _grads(ref, _loss, ids, pos, mask)
  _close_grads(_grads(got, _loss, ids, pos, mask), want)


def _shared_loss(m, pt, pp, pm, ct, cp, cm):
  _, h = m.hidden_shared(pt, pp, pm, ct, cp, cm)
  w = jax.random.normal(jax.random.key(0), h.shape[-1:])  # linear in h
  return jnp.sum(jnp.where(cm[..., None], h * w, 0.0))


@pytest.mark.parametrize("impl", IMPLS)
def test_shared_prompt_forward_and_gradient(models, impl):
  ids, mask, _ = ragged_batch(VOCAB, [7, 3], 7, seed=4)
  pp = np.maximum(np.cumsum(mask, 1) - 1, 0)
  g = 3  # rows per prompt
  rng = np.random.default_rng(0)
  ct = rng.integers(3, VOCAB, (2 * g, 6))
  cm = np.arange(6)[None] < rng.integers(1, 7, (2 * g, 1))
  cp = np.repeat(pp[:, -1:] + 1, g, 0) + np.arange(6)[None]
  args = [jnp.asarray(a) for a in (ids, pp, mask, ct, cp, cm)]
  _, want = models["xla"].hidden_shared(*args)
  _, got = models[impl].hidden_shared(*args)
  _close(np.asarray(got)[cm], np.asarray(want)[cm])
  gw = _grads(models["xla"], _shared_loss, *args)
  gg = _grads(models[impl], _shared_loss, *args)
  _close_grads(gg, gw)


@pytest.mark.parametrize("impl", IMPLS)
def test_prefill_into_a_filled_cache(models, impl):
  """Two prefills into one cache (the second attends to the first's keys)
  and one decode step: the splash path merges cached and new keys."""
  ids, pos, mask = _batch(seed=2)
  outs = {}
  for name in ("xla", impl):
    m = models[name]
    cache = model.KVCache.zeros(m.cfg, 3, 32)
    h1, cache = m.hidden(ids[:, :12], pos[:, :12], mask[:, :12], cache)
    h2, cache = m.hidden(ids[:, 12:16], pos[:, 12:16], mask[:, 12:16], cache)
    h3, _ = m.hidden(ids[:, 16:], pos[:, 16:], mask[:, 16:], cache)
    outs[name] = [np.asarray(h) for h in (h1, h2, h3)]
  valid = np.asarray(mask)
  for got, want, sl in zip(outs[impl], outs["xla"],
                           (slice(0, 12), slice(12, 16), slice(16, 17)),
                           strict=True):  # fmt: skip
    _close(got[valid[:, sl]], want[valid[:, sl]])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("slots", [0, 3])
def test_sampling(models, impl, slots):
  ids, mask, _ = ragged_batch(VOCAB, [6, 3], 6, seed=7)
  cfg = sampler.SamplingConfig(6, temperature=1.0, stop_ids=(5, 6, 7, 8),
                               slots=slots)  # fmt: skip
  key = jax.random.key(2)
  want = sampler.sample(models["xla"], ids, mask, key, cfg, num_samples=3)
  got = sampler.sample(models[impl], ids, mask, key, cfg, num_samples=3)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  _close(got.logprobs, want.logprobs)


def test_merge_ignores_an_empty_part():
  o = jnp.ones((1, 2, 1, 4))
  nan = jnp.full((1, 2, 1, 4), jnp.nan)
  lse = jnp.zeros((1, 2, 1))
  out = attention.merge(o, lse, nan, jnp.full((1, 2, 1), -jnp.inf))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(o))


def test_decode_key_layout():
  """A decode step of ``xla`` and ``cudnn`` runs ``dense`` over keys
  stored [B,K,H,S]; splash keeps the kernel's [S,H]."""
  assert attention.decode_key_layout("xla") == "hs"
  assert attention.decode_key_layout("cudnn") == "hs"
  assert attention.decode_key_layout("splash") == "sh"
  with pytest.raises(ValueError, match="model.attention"):
    attention.decode_key_layout("flash")


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_reads_either_key_layout(impl):
  """A decode step's attention is the same from keys stored [B,K,S,H] and
  [B,K,H,S] on every backend (the kernels transpose the latter)."""
  r = np.random.default_rng(0)
  q = jnp.asarray(r.standard_normal((2, 1, 4, 8)), jnp.float32)
  k = jnp.asarray(r.standard_normal((2, 2, 16, 8)), jnp.float32)
  v = jnp.asarray(r.standard_normal((2, 2, 16, 8)), jnp.float32)
  allowed = jnp.asarray(np.arange(16)[None, None] < [[[5]], [[11]]])
  want = attention.cached_attention("xla", q, k, v, allowed, jnp.float32)
  for layout, keys in (("sh", k), ("hs", k.swapaxes(2, 3))):
    got = attention.cached_attention(
      impl, q, keys, v, allowed, jnp.float32, key_layout=layout
    )
    _close(got, want)


def test_bad_attention():
  with pytest.raises(ValueError, match="model.attention"):
    model.ModelConfig("llama", 10, 8, 1, 2, 1, 4, 8, attention="flash")
  cfg = dataclasses.replace(model.named_arch("smollm2_135m"), attention="xla")
  assert cfg.attention == "xla"
