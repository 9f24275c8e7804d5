"""Sampler: greedy = transformers, log-probs = full forward, distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import ragged_batch, tiny_hf, torch

from multians_jax import sharding
from multians_jax.interop import hf
from multians_jax.model import sampler
from multians_jax.model import transformer as model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  out = {}
  for fam, kw in [("llama", {"tied": True}), ("qwen2", {}), ("qwen3", {})]:
    ref = tiny_hf(fam, heads=4, kv=2, **kw)
    d = tmp_path_factory.mktemp(fam)
    ref.save_pretrained(d)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    m, _, _ = hf.load(str(d), mesh, sharding.TRAIN_RULES)
    out[fam] = (ref, m)
  return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_equals_transformers_generate(family, tiny):
  ref, ours = tiny[family]
  ids, mask, _ = ragged_batch(101, [5, 2, 7, 1], 7, seed=3)
  # Pick a stop id that some row emits early, so EOS lands inside the batch.
  probe = sampler.sample(
    ours,
    ids,
    mask,
    jax.random.key(0),
    sampler.SamplingConfig(6, temperature=0.0),
  )
  eos = int(np.asarray(probe.tokens)[2, 2])
  cfg = sampler.SamplingConfig(12, temperature=0.0, stop_ids=(eos,))
  r = sampler.sample(ours, ids, mask, jax.random.key(0), cfg)
  with torch.no_grad():
    g = ref.generate(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask * 1),
        max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0,
    )[:, ids.shape[1]:].numpy()  # fmt: skip
  g = np.pad(g, ((0, 0), (0, 12 - g.shape[1])))
  toks, lengths = np.asarray(r.tokens), np.asarray(r.lengths)
  assert (lengths < 12).any() and np.asarray(r.truncated).any()
  for b in range(4):
    n = lengths[b]
    np.testing.assert_array_equal(toks[b, :n], g[b, :n])
    assert (toks[b, n:] == 0).all()
    assert bool(r.truncated[b]) == (eos not in toks[b, :n])


def _truncated_logp(z, top_k, top_p, y):
  """log q(y), q = softmax(z) on its top-k, then top-p support, in numpy."""
  order = np.argsort(-z)
  if top_k:
    order = order[:top_k]
  p = np.exp(z[order] - z[order].max())
  p /= p.sum()
  n = int(np.searchsorted(np.cumsum(p) - p, top_p, side="left"))
  kept = order[: max(n, 1)]
  assert y in kept  # the sampler drew from this support
  return z[y] - (z[kept].max() + np.log(np.exp(z[kept] - z[kept].max()).sum()))


@pytest.mark.parametrize("slots", [0, 4])  # static; refilled
def test_logprobs_match_full_forward(tiny, slots):
  """The sampler's log-probs are those of the distribution it drew from:
  softmax(logits / T) on the top-k, then top-p support, renormalised; also
  when rows that stop early hand their slot to the next row."""
  _, m = tiny["qwen3"]
  ids, mask, _ = ragged_batch(101, [6, 3], 6, seed=5)
  cfg = sampler.SamplingConfig(10, temperature=0.7, top_k=20, top_p=0.9,
                               stop_ids=(7, 8, 9), slots=slots)  # fmt: skip
  r = sampler.sample(m, ids, mask, jax.random.key(1), cfg, num_samples=3)
  prompt_tokens, prompt_mask = r.row_prompts()
  seq = np.concatenate([np.asarray(prompt_tokens), np.asarray(r.tokens)], 1)
  smask = np.concatenate([np.asarray(prompt_mask), np.asarray(r.mask)], 1)
  pos = np.maximum(np.cumsum(smask, 1) - 1, 0)
  logits, _ = m(jnp.asarray(seq), jnp.asarray(pos), jnp.asarray(smask))
  z = np.asarray(logits, np.float64) / 0.7
  t = r.prompt_tokens.shape[1]
  got, cm = np.asarray(r.logprobs), np.asarray(r.mask)
  n = 0
  for b, j in zip(*np.nonzero(cm), strict=True):
    want = _truncated_logp(z[b, t - 1 + j], 20, 0.9, seq[b, t + j])
    np.testing.assert_allclose(got[b, j], want, atol=1e-4)
    n += 1
  assert n > 20 and (got[~cm] == 0).all()
  # Prompt-major group layout, each prompt carried once.
  assert r.group_size == 3 and r.prompt_tokens.shape[0] == 2
  np.testing.assert_array_equal(np.asarray(r.prompt_tokens)[:, -3:],
                                ids[:, -3:])  # fmt: skip
  np.testing.assert_array_equal(np.asarray(prompt_tokens)[:3, -3:],
                                np.repeat(ids[:1, -3:], 3, 0))  # fmt: skip


def _freqs(logits, cfg, n=40000, seed=0):
  rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
  u = jax.random.uniform(jax.random.key(seed), (n, 1))
  tok, _ = sampler._choose(rows, u, cfg)
  return np.bincount(np.asarray(tok), minlength=len(logits)) / n


LOGITS = np.log(np.array([0.35, 0.25, 0.15, 0.1, 0.08, 0.04, 0.02, 0.01]))


@pytest.mark.parametrize(
  "temperature,top_k,top_p",
  [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.5, 3, 1.0), (1.0, 0, 0.7), (0.8, 4, 0.8)],
)
def test_sampling_distribution(temperature, top_k, top_p):
  cfg = sampler.SamplingConfig(1, temperature=temperature, top_k=top_k,
                               top_p=top_p)  # fmt: skip
  # The exact truncated distribution, computed independently in numpy.
  p = np.exp(LOGITS / temperature)
  p /= p.sum()
  order = np.argsort(-p)
  keep = np.zeros_like(p, bool)
  cum = 0.0
  for rank, i in enumerate(order):
    if (top_k and rank >= top_k) or cum >= top_p - 1e-12:
      break
    keep[i] = True
    cum += p[i]
  q = np.where(keep, p, 0)
  q /= q.sum()
  f = _freqs(LOGITS, cfg)
  assert (f[~keep] == 0).all()
  # 5 standard errors of a binomial proportion with n = 40000.
  assert np.all(np.abs(f - q) <= 5 * np.sqrt(q * (1 - q) / 40000) + 1e-9)


def test_no_recompile_for_same_bucket(tiny):
  _, m = tiny["llama"]
  cfg = sampler.SamplingConfig(4, temperature=1.0)
  ids, mask, _ = ragged_batch(101, [5, 3], 5, seed=1)
  sampler.sample(m, ids, mask, jax.random.key(0), cfg, num_samples=2)
  n = sampler.compile_count()
  ids2, mask2, _ = ragged_batch(101, [9, 2], 9, seed=2)  # same 16-bucket
  r = sampler.sample(m, ids2, mask2, jax.random.key(1), cfg, num_samples=2)
  assert sampler.compile_count() == n
  assert r.prompt_tokens.shape == (2, 16) and r.tokens.shape[0] == 4
  ids3, mask3, _ = ragged_batch(101, [17, 2], 17, seed=2)  # next bucket
  sampler.sample(m, ids3, mask3, jax.random.key(1), cfg, num_samples=2)
  assert sampler.compile_count() == n + 1


def test_group_samples_differ_and_stop_rows_pad(tiny):
  _, m = tiny["qwen2"]
  ids, mask, _ = ragged_batch(101, [4], 4)
  cfg = sampler.SamplingConfig(8, temperature=1.0, stop_ids=(5, 6, 7))
  r = sampler.sample(m, ids, mask, jax.random.key(2), cfg, num_samples=16)
  toks = np.asarray(r.tokens)
  assert len({tuple(t) for t in toks}) > 8
  for t, n, tr in zip(
    toks, np.asarray(r.lengths), np.asarray(r.truncated), strict=True
  ):
    stops = np.isin(t[:n], (5, 6, 7))
    assert stops.sum() == (0 if tr else 1) and (tr or stops[n - 1])


def test_sharded_sampling_equals_single_device(tiny):
  _, m = tiny["qwen3"]
  ids, mask, _ = ragged_batch(101, [6, 3, 5, 2], 6, seed=9)
  cfg = sampler.SamplingConfig(6, temperature=0.0)
  want = sampler.sample(m, ids, mask, jax.random.key(0), cfg, num_samples=2)
  mesh = sharding.make_mesh(2, 2, 2)
  # The trainer's FSDP/TP-sharded parameters, used as they are.
  graphdef, state = nnx.split(m)
  state = jax.device_put(
    state, model.state_shardings(state, mesh, sharding.TRAIN_RULES)
  )
  m = nnx.merge(graphdef, state)
  assert not m.layers.w_up[...].sharding.is_fully_replicated
  got = sampler.sample(m, ids, mask, jax.random.key(0), cfg, num_samples=2,
                       mesh=mesh)  # fmt: skip
  assert got.tokens.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_allclose(np.asarray(got.logprobs),
                             np.asarray(want.logprobs), atol=1e-5)  # fmt: skip


def test_bad_inputs():
  with pytest.raises(ValueError, match="top_p"):
    sampler.SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="max_new_tokens"):
    sampler.SamplingConfig(max_new_tokens=0)
  assert sampler.prompt_bucket(1) == 16 and sampler.prompt_bucket(17) == 32
