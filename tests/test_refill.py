"""The refilling sampler (``SamplingConfig.slots``): S < B slots, each
starting the next row of the rollout when its row stops, draw exactly what
the static batch draws."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from hf_models import ragged_batch
from test_bench import assert_no_big_copies, decode_loops

from multians_jax import sharding
from multians_jax.model import sampler
from multians_jax.model import transformer as model

VOCAB = 64
STOPS = (5, 6, 7, 8)  # 1 in 16 tokens stops: long-tailed lengths


@pytest.fixture(scope="module")
def tiny():
  cfg = model.ModelConfig(
    "llama", VOCAB, 64, 2, 4, 2, 16, 128, tie_embeddings=True,
    max_seq_len=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
  )  # fmt: skip
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  return model.init_model(cfg, mesh, sharding.TRAIN_RULES)


def _assert_same(got, want):
  for f in ("tokens", "lengths", "mask", "truncated", "prompt_tokens"):
    np.testing.assert_array_equal(
      np.asarray(getattr(got, f)), np.asarray(getattr(want, f)), err_msg=f
    )
  np.testing.assert_allclose(
    np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5
  )


@pytest.mark.parametrize(
  "slots,temperature,top_p", [(1, 1.0, 1.0), (3, 1.0, 1.0), (5, 0.8, 0.9),
                              (11, 0.0, 1.0)],
)  # fmt: skip
def test_refilled_rows_equal_the_static_batch(tiny, slots, temperature, top_p):
  ids, mask, _ = ragged_batch(VOCAB, [5, 3, 7], 7, seed=1)
  base = sampler.SamplingConfig(12, temperature=temperature, top_p=top_p,
                                stop_ids=STOPS)  # fmt: skip
  key = jax.random.key(3)
  want = sampler.sample(tiny, ids, mask, key, base, num_samples=4)
  lengths = np.asarray(want.lengths)
  if temperature:  # the case the refill is for: lengths differ
    assert lengths.min() < 6 and lengths.max() == 12
  cfg = dataclasses.replace(base, slots=slots)
  _assert_same(sampler.sample(tiny, ids, mask, key, cfg, num_samples=4), want)


def test_a_row_that_stops_at_once_frees_its_slot(tiny):
  """First tokens that are stop tokens (greedy on a biased model) and
  ``max_new_tokens = 1``: rows of length 1 at every refill."""
  ids, mask, _ = ragged_batch(VOCAB, [4, 2, 6, 3], 6, seed=4)
  greedy = sampler.SamplingConfig(1, temperature=0.0)
  probe = sampler.sample(tiny, ids, mask, jax.random.key(0), greedy)
  first = tuple(int(t) for t in np.asarray(probe.tokens)[:2, 0])
  for steps in (1, 6):
    base = sampler.SamplingConfig(steps, temperature=0.0, stop_ids=first)
    want = sampler.sample(tiny, ids, mask, jax.random.key(0), base, 2)
    assert (np.asarray(want.lengths)[:4] == 1).all()
    cfg = dataclasses.replace(base, slots=3)
    got = sampler.sample(tiny, ids, mask, jax.random.key(0), cfg, 2)
    _assert_same(got, want)


def test_more_slots_than_rows_is_the_static_batch(tiny):
  ids, mask, _ = ragged_batch(VOCAB, [5, 3], 5, seed=2)
  base = sampler.SamplingConfig(6, temperature=1.0, stop_ids=STOPS)
  want = sampler.sample(tiny, ids, mask, jax.random.key(5), base, 2)
  n = sampler.compile_count()
  for slots in (4, 9):  # B = 4 rows
    cfg = dataclasses.replace(base, slots=slots)
    _assert_same(sampler.sample(tiny, ids, mask, jax.random.key(5), cfg, 2),
                 want)  # fmt: skip
  assert sampler.compile_count() == n + 2  # cfg is a compilation key


def test_sharded_refill_equals_single_device(tiny):
  ids, mask, _ = ragged_batch(VOCAB, [6, 3, 5, 2], 6, seed=9)
  cfg = sampler.SamplingConfig(8, temperature=1.0, stop_ids=STOPS, slots=4)
  want = sampler.sample(tiny, ids, mask, jax.random.key(0), cfg, 3)
  mesh = sharding.make_mesh(2, 2, 2)
  graphdef, state = nnx.split(tiny)
  state = jax.device_put(
    state, model.state_shardings(state, mesh, sharding.TRAIN_RULES)
  )
  got = sampler.sample(nnx.merge(graphdef, state), ids, mask,
                       jax.random.key(0), cfg, 3, mesh=mesh)  # fmt: skip
  _assert_same(got, want)


def test_refill_loop_copies_neither_cache_nor_weights(tiny):
  """The slots' caches are written in place (one scatter per layer and
  k/v); prompt copies are dynamic-update-slices of one slot."""
  cfg = tiny.cfg
  p, t, g, slots = 2, 16, 3, 4
  scfg = sampler.SamplingConfig(8, temperature=0.7, slots=slots)
  caches, loops = decode_loops(tiny, scfg, p, t, g, slots)
  big = (*caches, f"f32[{cfg.d_model},{cfg.d_ff}]",
         f"f32[{cfg.d_ff},{cfg.d_model}]")  # fmt: skip
  for body, called in loops:
    assert_no_big_copies([body, *called], big)


def test_bad_slots():
  with pytest.raises(ValueError, match="slots"):
    sampler.SamplingConfig(slots=-1)
