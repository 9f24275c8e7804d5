"""METHOD §6 metrics on hand-computed examples and brute-force references."""

import itertools
import math

import numpy as np
import pytest

from multians_jax import metrics
from multians_jax.data import prompts
from multians_jax.report import plotting
from multians_jax.rl import reward

# P = 2 prompts, G = 2 generations, A = 2 answers.
ENTRY = np.array(
  [
    [[0, 1], [1, 2]],  # prompt 0: entries {0, 1} then {1, 2}
    [[-1, -1], [-1, 3]],  # prompt 1: nothing, then entry 3
  ]
)


def test_coverage_recall_pass_pooling():
  np.testing.assert_array_equal(metrics.coverage_at_k(ENTRY, 2), [2, 0])
  np.testing.assert_array_equal(metrics.coverage_at_k(ENTRY, 4), [3, 1])
  np.testing.assert_allclose(metrics.recall_at_k(ENTRY, 4, [4, 2]), [0.75, 0.5])
  np.testing.assert_array_equal(metrics.pass_at_k(ENTRY, 2), [1, 0])
  np.testing.assert_array_equal(metrics.pass_at_k(ENTRY, 4), [1, 1])
  with pytest.raises(ValueError, match="multiple of A"):
    metrics.coverage_at_k(ENTRY, 3)
  with pytest.raises(ValueError, match="G=2"):
    metrics.coverage_at_k(ENTRY, 6)


def test_pass_at_k_unbiased_matches_brute_force():
  for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (6, 5, 2), (7, 3, 4)]:
    subsets = list(itertools.combinations(range(n), k))
    brute = np.mean([any(i < c for i in s) for s in subsets])
    assert metrics.pass_at_k_unbiased(n, c, k) == pytest.approx(brute)
  np.testing.assert_allclose(
    metrics.pass_at_k_unbiased([4, 4], [1, 2], 2), [0.5, 5 / 6]
  )
  with pytest.raises(ValueError, match="exceeds"):
    metrics.pass_at_k_unbiased(2, 1, 3)


def test_top1_unique_duplicates():
  correct = np.array([[1, 0, 0], [0, 1, 0]])
  conf = np.array([[0.2, 0.7, 0.1], [0.3, 0.3, 0.4]])
  np.testing.assert_array_equal(metrics.top1_accuracy(correct, conf), [0, 0])
  np.testing.assert_array_equal(metrics.top1_accuracy(correct), [1, 0])
  keys = np.array([[[5, 5], [6, -1]], [[1, 2], [2, 1]]])
  np.testing.assert_array_equal(metrics.unique_answers(keys, 4), [2, 2])
  np.testing.assert_allclose(
    metrics.duplicate_rate(keys), [[0.5, 0.0], [0.0, 0.0]]
  )


def test_brier_ece_auroc_hand_computed():
  q = np.array([[0.9, 0.2], [0.6, 0.05]])
  c = np.array([[1, 0], [0, 0]])
  np.testing.assert_allclose(metrics.set_brier(q, c), [0.05, 0.3625])
  assert metrics.per_answer_brier(q, c) == pytest.approx(0.4125 / 4)
  assert metrics.mean_conf_sum(q) == pytest.approx(0.875)
  # bins: 0.05 → bin0 (acc 0), 0.2 → bin2 (acc 0), 0.6 → bin6 (0), 0.9 → 1.
  assert metrics.ece(q, c) == pytest.approx((0.05 + 0.2 + 0.6 + 0.1) / 4)
  # positives {0.9}; negatives {0.2, 0.6, 0.05}: all below → AUROC 1.
  assert metrics.auroc(q, c) == 1.0
  # ties: pos {0.5, 0.8}, neg {0.5, 0.2}: pairs won 1 + 0.5 + 1 + 1 = 3.5/4.
  assert metrics.auroc([0.5, 0.8, 0.5, 0.2], [1, 1, 0, 0]) == 0.875
  assert math.isnan(metrics.auroc([0.1, 0.2], [1, 1]))


def test_ece_against_loop_reference():
  rng = np.random.default_rng(0)
  q, c = rng.random(500), rng.random(500) < 0.4
  ref = 0.0
  for b in range(10):
    lo, hi = b / 10, (b + 1) / 10
    m = (q >= lo) & ((q < hi) if b < 9 else (q <= hi))
    if m.any():
      ref += m.mean() * abs(c[m].mean() - q[m].mean())
  assert metrics.ece(q, c) == pytest.approx(ref)


def test_tokens_per_distinct_correct_and_rates():
  lengths = np.array([[10, 20], [30, 40]])
  assert metrics.tokens_per_distinct_correct(lengths, ENTRY) == 25.0
  none = -np.ones_like(ENTRY)
  assert metrics.tokens_per_distinct_correct(lengths, none) == math.inf
  assert metrics.format_valid_rate([1, 0, 1, 1]) == 0.75


def test_single_answer_pass_at_k_is_the_unbiased_estimate():
  """RLVR, G = 4 samples per prompt, correct = [1, 0, 0, 0] and
  [0, 0, 1, 1]: pass@1 = mean(1/4, 2/4); pass@2 = mean(1 - C(3,2)/C(4,2),
  1 - C(2,2)/C(4,2)) = mean(1/2, 5/6) (the first two samples alone would
  say mean(1, 0))."""
  cfg = reward.RewardConfig(mode="rlvr", num_answers=1)
  right = prompts.format_completion("rlvr", ["Paris"], None)
  wrong = prompts.format_completion("rlvr", ["Nice"], None)
  texts = [right, wrong, wrong, wrong, wrong, wrong, right, right]
  scores = reward.score_texts(texts, [[["Paris"]]] * 8, cfg)
  out = metrics.summarize(scores, group_size=4, ks=[1, 2, 4])
  assert out["pass@1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
  assert out["pass@2"] == pytest.approx((1 / 2 + 5 / 6) / 2)
  assert out["pass@4"] == 1.0


def test_summarize_from_score_texts(tmp_path):
  cfg = reward.RewardConfig(mode="multi_rlcr", num_answers=2)
  gold = [[["Paris"], ["Lyon"]]] * 2 + [[["Rome"]]] * 2
  texts = [
    prompts.format_completion("multi_rlcr", ["Paris", "Nice"], [0.6, 0.3]),
    prompts.format_completion("multi_rlcr", ["Lyon", "Paris"], [0.5, 0.4]),
    prompts.format_completion("multi_rlcr", ["Milan", "Rome"], [0.7, 0.2]),
    "garbage",
  ]
  scores = reward.score_texts(texts, gold, cfg)
  out = metrics.summarize(scores, [10, 20, 30, 5], 2, num_gold=[2, 1])
  assert out["coverage@2"] == 1.0  # prompt 0: 1, prompt 1: 1
  assert out["coverage@4"] == 1.5  # prompt 0 pools Paris + Lyon
  assert out["recall@4"] == 1.0
  assert out["pass@2"] == 1.0 and out["format_valid_rate"] == 0.75
  assert out["top1_accuracy"] == pytest.approx(2 / 4)
  assert out["tokens_per_distinct_correct"] == pytest.approx(65 / 3)
  assert out["reward/total"] == pytest.approx(np.mean(scores.total))
  assert all(isinstance(v, float) for v in out.values())
  plotting.reliability_diagram(tmp_path / "rel.png", scores.confidence, [0] * 8)
  plotting.coverage_vs_k(tmp_path / "cov.png", [2, 4], {"m": [1.0, 1.5]})
  for name in ("rel.png", "cov.png"):
    assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(ValueError, match="points"):
    plotting.coverage_vs_k(tmp_path / "x.png", [1, 2], {"m": [1.0]})


def test_slot_summary_by_hand():
  """G = 2, A = 2, two groups: per slot the answers' entropy
  within each group, the parts of decomposable rows, distractors."""
  scores = reward.Scores(
    answer_key=np.array([[0, 1], [0, 2], [3, -1], [4, 5]]),
    format_ok=np.array([1.0, 1.0, 1.0, 0.0]),
    decomposable=np.array([1.0, 1.0, 0.0, 0.0]),
    slot=np.array([[1.0, -0.5], [0.5, 0.0], [9, 9], [9, 9]]),
    slot_cal=np.array([[-0.1, -0.2], [-0.3, 0.0], [0, 0], [0, 0]]),
    confidence=np.array([[0.6, 0.2], [0.5, 0.4], [0.1, 0.0], [0, 0]]),
  )
  answer_p = np.array([[0.5, 0.0], [0.5, 0.3], [0.0, 0.0], [0.2, 0.2]])
  out = metrics.slot_summary(scores, 2, answer_p)
  # slot 1: group 0 answers {0, 0} → 0 nats; group 1: row 3 invalid, {3}
  assert out["slot1/answer_entropy"] == 0.0
  # slot 2: group 0 {1, 2} → log 2; group 1 has no valid answer
  assert out["slot2/answer_entropy"] == pytest.approx(math.log(2))
  assert out["slot1/part"] == pytest.approx(0.75)
  assert out["slot2/cal"] == pytest.approx(-0.1)
  # slot 1: valid answers rows 0, 1, 2; row 2's has p = 0 (q 0.1)
  assert out["slot1/distractor_frac"] == pytest.approx(1 / 3)
  assert out["slot1/distractor_q"] == pytest.approx(0.1)
  assert out["slot2/distractor_frac"] == pytest.approx(1 / 2)
  assert out["slot2/distractor_q"] == pytest.approx(0.2)
