"""Dynamic sampling (rollouts.dynamic_fill) on hand-made rounds."""

import jax.numpy as jnp
import numpy as np
import pytest

from multians_jax.model import sampler
from multians_jax.rl import reward, rollouts

G = 2


def _round(acc, t, tag):
  """A Scored batch of len(acc) / G groups: prompt length t, token values
  tag·100 + row so every row is recognisable."""
  b = len(acc)
  rows = np.arange(b)[:, None]
  ro = sampler.Rollout(  # each prompt once: b / G of them
    prompt_tokens=jnp.asarray(  # tag·10 + group
      np.full((b // G, t), tag * 10) + np.arange(b // G)[:, None], jnp.int32
    ),
    prompt_mask=jnp.ones((b // G, t), bool),
    tokens=jnp.asarray(tag * 100 + rows + np.zeros((b, 3)), jnp.int32),
    logprobs=jnp.zeros((b, 3)),
    mask=jnp.ones((b, 3), bool),
    lengths=jnp.full((b,), 3, jnp.int32),
    truncated=jnp.zeros((b,), bool),
  )
  scores = reward.Scores(
    acc=np.asarray(acc, np.float32),
    total=np.asarray(acc, np.float32) + 0.1 * np.arange(b),
  )
  rewards = rollouts.Rewards(
    scores, np.full((b,), 3), np.zeros((b,), bool), texts=("x",) * b
  )
  return rollouts.Scored(ro, rewards, (1.0, 0.5))


def test_flat_groups_use_the_binary_outcome_not_the_total():
  sc = _round([1, 0, 0, 0, 2, 1], 4, 0).rewards
  # group 1 fails everywhere although its totals differ (0.2 vs 0.3)
  np.testing.assert_array_equal(
    rollouts.flat_groups(sc, G), [False, True, True]
  )


def test_refill_from_a_second_round():
  first = _round([1, 0, 0, 0, 1, 1], 4, 1)  # keep group 0 only
  second = _round([0, 0, 0, 1, 1, 0], 6, 2)  # keep groups 1, 2
  calls = []

  def more(r):
    calls.append(r)
    return second

  out, live, info = rollouts.dynamic_fill(first, more, G, max_rounds=3)
  assert calls == [1]
  assert live.all()
  assert info == {
    "dynamic/filtered_frac": 3 / 6,
    "dynamic/rounds": 1.0,
    "dynamic/filler_frac": 0.0,
  }
  np.testing.assert_array_equal(
    np.asarray(out.rollout.tokens)[:, 0], [100, 101, 202, 203, 204, 205]
  )
  np.testing.assert_array_equal(out.rewards.scores.acc, [1, 0, 0, 1, 1, 0])
  np.testing.assert_allclose(
    out.rewards.scores.total, [1.0, 0.1, 0.2, 1.3, 1.4, 0.5]
  )
  # Round 1's prompts are left-padded to round 2's length 6.
  pm = np.asarray(out.rollout.prompt_mask)
  assert pm.shape == (3, 6)  # 3 groups' prompts, once each
  np.testing.assert_array_equal(pm[:1], [[0, 0, 1, 1, 1, 1]])
  assert pm[1:].all()
  np.testing.assert_array_equal(
    np.asarray(out.rollout.prompt_tokens)[:, -1], [10, 21, 22]
  )
  assert out.seconds == (2.0, 1.0)


def test_rounds_run_out_and_fillers_are_masked():
  first = _round([1, 0, 0, 0, 1, 1], 4, 1)
  second = _round([0, 0, 1, 1, 0, 0], 4, 2)  # all flat
  out, live, info = rollouts.dynamic_fill(first, lambda r: second, G, 1)
  assert info["dynamic/rounds"] == 1.0
  assert info["dynamic/filtered_frac"] == 5 / 6
  assert info["dynamic/filler_frac"] == pytest.approx(2 / 3)
  np.testing.assert_array_equal(live, [1, 1, 0, 0, 0, 0])
  # Kept group first, then the last two dropped groups.
  np.testing.assert_array_equal(
    np.asarray(out.rollout.tokens)[:, 0], [100, 101, 202, 203, 204, 205]
  )
  mask = np.asarray(out.rollout.mask)
  assert mask[:2].all() and not mask[2:].any()


def test_no_flat_group_returns_the_first_batch():
  first = _round([1, 0, 0, 1], 4, 1)
  out, live, info = rollouts.dynamic_fill(
    first, lambda r: pytest.fail("no refill needed"), G, 3
  )
  assert out is first and live.all()
  assert info["dynamic/rounds"] == 0.0 and info["dynamic/filtered_frac"] == 0.0


def test_max_rounds_zero_only_masks():
  first = _round([0, 0, 1, 0], 4, 1)
  out, live, info = rollouts.dynamic_fill(
    first, lambda r: pytest.fail("no extra round allowed"), G, 0
  )
  np.testing.assert_array_equal(live, [1, 1, 0, 0])
  # the kept group moves first, the dropped one fills
  np.testing.assert_array_equal(
    np.asarray(out.rollout.tokens)[:, 0], [102, 103, 100, 101]
  )


def test_answer_probs_read_p_and_the_training_frequencies():
  cfg = reward.RewardConfig(
    mode="multi_rlvr", num_answers=2, require_think=False
  )
  dist = {"answers": ["flu", "cold"], "probs": [0.6, 0.4]}
  metas = [
    {"distribution": {**dist, "train_probs": [0.55, 0.45]}},
    {"distribution": dist},  # no training frequencies: 0
    None,  # no distribution: 0
  ]
  text = "<answer1>cold</answer1>\n<answer2>measles</answer2>"
  fields = ("probs", "train_probs")
  p, train = rollouts.answer_probs([text] * 3, metas, cfg, fields)
  np.testing.assert_allclose(p, [[0.4, 0.0], [0.4, 0.0], [0.0, 0.0]])
  np.testing.assert_allclose(train, [[0.45, 0.0], [0.0, 0.0], [0.0, 0.0]])
  (alone,) = rollouts.answer_probs([text] * 3, metas, cfg)
  np.testing.assert_allclose(alone, p)
