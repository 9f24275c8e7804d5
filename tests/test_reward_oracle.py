"""The set-reward kernel against a slow, literal Python oracle of METHOD §3."""

import itertools
import math
import random
import re
import string

import numpy as np
import pytest

from multians_jax.data import prompts
from multians_jax.rl import reward

MODES = prompts.MODES
STATIC = list(itertools.product(MODES, reward.PRESETS, reward.CORRECTNESS))


def oracle(entry_ids, keys, confs, f, mode, correctness, preset, gates):
  """METHOD §3 for one completion, written out line by line."""
  require_distinct, sum_le_one, penalty, (w_f, w_a, w_b) = gates
  k = len(entry_ids)
  c = [1.0 if e >= 0 else 0.0 for e in entry_ids]
  d = len({e for e in entry_ids if e >= 0})
  u = len(set(keys)) == k
  q = [0.0 if math.isnan(x) else x for x in confs]
  brier = sum((q[i] - c[i]) ** 2 for i in range(k)) / k
  r_acc = {"count": d, "count_over_k": d / k, "any": 1.0 * (d >= 1)}
  acc = r_acc[correctness]
  if not f or (mode == "multi_rlcr" and require_distinct and not u):
    acc = 0.0
  calibrated = mode in ("multi_rlcr", "rlcr")
  gated = (
    not f
    or (require_distinct and not u)
    or (sum_le_one and sum(q) > 1 + reward.SUM_TOL)
  )
  if preset == "paper":
    if not f:
      return penalty
    if not calibrated:
      return acc
    return acc - (1.0 if gated else brier)
  total = w_f * f + w_a * acc
  if calibrated and not gated:
    total += w_b * (1 - brier)
  return total


def random_rows(rng, n, a):
  ids = rng.integers(-1, 3, size=(n, a)).astype(np.int32)
  keys = rng.integers(0, a + 1, size=(n, a)).astype(np.int32)
  conf = rng.choice([0.0, 0.1, 0.25, 0.5, 0.75, 1.0], size=(n, a))
  conf = np.where(rng.random((n, a)) < 0.5, rng.random((n, a)), conf)
  conf = np.where(rng.random((n, a)) < 0.1, np.nan, conf).astype(np.float32)
  f = rng.random(n) < 0.8
  return ids, keys, conf, f


@pytest.mark.parametrize("mode,preset,correctness", STATIC)
def test_kernel_equals_oracle(mode, preset, correctness):
  rng = np.random.default_rng(hash((mode, preset, correctness)) % 2**32)
  a = 3 if prompts.is_multi(mode) else 1
  ids, keys, conf, f = random_rows(rng, 128, a)
  for require_distinct, sum_le_one in itertools.product([True, False], [1, 0]):
    penalty = float(rng.uniform(-1, 0))
    weights = tuple(float(w) for w in rng.uniform(0.1, 1.0, 3))
    gates = (require_distinct, bool(sum_le_one), penalty, weights)
    out = reward.set_reward_kernel(
      ids,
      keys,
      conf,
      f,
      mode=mode,
      correctness=correctness,
      preset=preset,
      require_distinct=require_distinct,
      confidence_sum_le_one=bool(sum_le_one),
      format_penalty=penalty,
      weights=weights,
    )
    want = [
      oracle(
        ids[b].tolist(),
        keys[b].tolist(),
        conf[b].astype(np.float64).tolist(),
        bool(f[b]),
        mode,
        correctness,
        preset,
        gates,
      )
      for b in range(len(f))
    ]
    np.testing.assert_allclose(out.total, want, rtol=1e-5, atol=1e-5)


def test_kernel_components_hand_computed():
  # Two aliases of one entry (ids 0, 0) count once: D = 2, not 3.
  ids = np.array([[0, 0, 1], [-1, -1, -1]], np.int32)
  keys = np.array([[0, 1, 2], [3, 3, 4]], np.int32)
  conf = np.array([[0.5, 0.2, 0.2], [0.4, np.nan, 0.1]], np.float32)
  f = np.array([True, True])
  out = reward.set_reward_kernel(ids, keys, conf, f, mode="multi_rlcr")
  np.testing.assert_array_equal(out.num_correct, [2, 0])
  np.testing.assert_array_equal(out.distinct, [1, 0])
  np.testing.assert_allclose(out.conf_sum, [0.9, 0.5], rtol=1e-6)
  b0 = (0.25 + 0.64 + 0.64) / 3
  np.testing.assert_allclose(out.brier, [b0, (0.16 + 0.01) / 3], rtol=1e-6)
  np.testing.assert_array_equal(out.brier_gated, [0, 1])
  np.testing.assert_allclose(out.total, [2 - b0, -1.0], rtol=1e-6)


# ------------------------------------------------- end to end through text

_POOL = [["United States", "USA", "the U.S.A."], ["Canada"], ["Mexico"]]
_WRONG = ["France", "Peru", "Japan", "canada!", "Brazil"]


def _oracle_norm(s):
  s = "".join(ch for ch in s.lower() if ch not in string.punctuation)
  return " ".join(w for w in s.split() if w not in ("a", "an", "the"))


def _oracle_entry(ans, gold):
  for e, aliases in enumerate(gold):
    if any(_oracle_norm(x) == _oracle_norm(ans) for x in aliases):
      return e
  return -1


def _random_completion(rng, mode, k):
  answers = [
    rng.choice(rng.choice(_POOL)) if rng.random() < 0.6 else rng.choice(_WRONG)
    for _ in range(k)
  ]
  confs = [round(rng.random(), 3) for _ in range(k)]
  text = prompts.format_completion(mode, answers, confs)
  ok = True
  if rng.random() < 0.2:
    text, ok = text.replace("</think>", "", 1), False
  elif mode == "multi_rlcr" and rng.random() < 0.3:
    blocks = re.findall(r"<answer\d>.*?</answer\d>", text)
    blocks += re.findall(r"<confidence\d>.*?</confidence\d>", text)
    text = "<think>x</think><analysis>a</analysis>" + "".join(blocks)
  return text, answers, confs, ok


@pytest.mark.parametrize("mode", MODES)
def test_score_texts_equals_oracle(mode):
  rng = random.Random(mode)
  k = 3 if prompts.is_multi(mode) else 1
  rows = [_random_completion(rng, mode, k) for _ in range(300)]
  for preset, correctness in itertools.product(
    reward.PRESETS, reward.CORRECTNESS
  ):
    cfg = reward.RewardConfig(
      mode=mode,
      num_answers=k,
      preset=preset,
      correctness=correctness,
      confidence_sum_le_one=True,  # the oracle's gates below
    )
    out = reward.score_texts([r[0] for r in rows], [_POOL] * len(rows), cfg)
    np.testing.assert_array_equal(out.format_ok, [r[3] for r in rows])
    gates = (True, True, 0.0, (0.5, 0.5, 0.5))
    for b, (_, answers, confs, ok) in enumerate(rows):
      ids = [_oracle_entry(x, _POOL) for x in answers]
      keys = [_oracle_norm(x) for x in answers]
      qs = confs if prompts.has_confidence(mode) else [math.nan] * k
      want = oracle(ids, keys, qs, ok, mode, correctness, preset, gates)
      assert out.total[b] == pytest.approx(want, abs=1e-5), (b, rows[b])
      assert out.entry_id[b].tolist() == ids
