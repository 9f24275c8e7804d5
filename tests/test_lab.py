"""The distributional lab: records, tokenizer, known-p metrics, warm-up
targets, the compare report, and the learning test of the four objectives."""

import collections
import json
import math
import os

import numpy as np
import pytest

from multians_jax import metrics, warmup
from multians_jax.config import RunConfig
from multians_jax.data import prompts
from multians_jax.data.datasets import distlab, schema
from multians_jax.report import compare
from multians_jax.rl import parsing, reward, rollouts

CFG = distlab.DistlabConfig(name="t", num_questions=4, train_per_question=32)


def _decoded(split):
  return [schema.decode(r) for r in distlab.records(CFG)[split]]


def test_distributions_have_a_unique_top_set_and_are_seeded():
  for case in range(20):
    cfg = distlab.DistlabConfig(name="t", seed=case % 3)
    answers, probs, distractors = distlab.distribution(cfg, case)
    assert math.isclose(sum(probs), 1.0, abs_tol=1e-9)
    assert probs == sorted(probs, reverse=True) and min(probs) > 0
    assert all(
      a - b >= cfg.min_gap - 1e-9
      for a, b in zip(probs[:3], probs[1:4], strict=True)
    )
    assert not set(answers) & set(distractors)
    assert sorted(answers + distractors) == sorted(distlab.NAMES)
    assert distlab.distribution(cfg, case) == (answers, probs, distractors)


def test_gold_answers_are_draws_from_p():
  cfg = distlab.DistlabConfig(
    name="t", num_questions=2, train_per_question=4000, test_per_question=10
  )
  recs = [schema.decode(r) for r in distlab.records(cfg)["train"]]
  for case in range(2):
    mine = [r for r in recs if r["meta"]["case"] == case]
    dist = mine[0]["meta"]["distribution"]
    counts = collections.Counter(r["answers"][0][0] for r in mine)
    assert set(counts) <= set(dist["answers"])
    columns = dist["answers"], dist["probs"], dist["train_probs"]
    for a, p, f in zip(*columns, strict=True):
      # 4000 draws: 4.5 standard errors; train_probs: their frequencies
      assert abs(counts[a] / 4000 - p) < 4.5 * math.sqrt(p * (1 - p) / 4000)
      assert f == pytest.approx(counts[a] / 4000, abs=1e-6)
  assert {r["question"] for r in recs} == {
    distlab.QUESTION.format(case=c) for c in range(2)
  }


def test_both_splits_hold_every_case_with_fresh_draws():
  train, test = _decoded("train"), _decoded("test")
  assert len(train) == 4 * 32 and len(test) == 4 * 8
  assert {r["meta"]["case"] for r in test} == set(range(4))
  assert not {r["id"] for r in train} & {r["id"] for r in test}


@pytest.mark.parametrize("mode", prompts.MODES)
def test_lab_tokenizer_round_trips_every_format(mode):
  tok = distlab.tokenizer()
  k = 3 if prompts.is_multi(mode) else 1
  answers = list(distlab.NAMES[:k])
  conf = [0.35, 0.2, 0.05][:k]
  text = prompts.format_completion(
    mode,
    answers,
    conf if prompts.has_confidence(mode) else None,
    think=None,
    analysis=prompts.DEFAULT_ANALYSIS,
  )
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert tok.unk_token_id not in ids
  assert len(ids) == k * (2 if prompts.has_confidence(mode) else 1) + (
    1 if prompts.has_confidence(mode) else 0
  )
  cfg = reward.RewardConfig(mode=mode, num_answers=3, require_think=False)
  parsed = parsing.parse(tok.decode(ids, skip_special_tokens=True), cfg)
  assert parsed.format_ok, parsed.error
  assert list(parsed.answers) == answers
  if prompts.has_confidence(mode):
    np.testing.assert_allclose(parsed.confidences, conf)


def test_lab_prompt_is_the_question_alone():
  tok = distlab.tokenizer()
  q = distlab.QUESTION.format(case=3)
  msgs = prompts.build_messages(q, "multi_rlcr", "ddx", 3)
  text = tok.apply_chat_template(
    msgs, add_generation_prompt=True, tokenize=False
  )
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert text == q and tok.unk_token_id not in ids


def test_expected_coverage_by_hand():
  # One prompt, G = 2 generations of A = 2 answers. p of the answers and
  # their keys; generation 2 repeats answer key 0 (counted once).
  answer_p = np.array([[[0.5, 0.2], [0.5, 0.1]]])
  keys = np.array([[[0, 1], [0, 2]]])
  assert metrics.expected_coverage_at_k(answer_p, keys, 2)[0] == pytest.approx(
    0.7
  )
  assert metrics.expected_coverage_at_k(answer_p, keys, 4)[0] == pytest.approx(
    0.8
  )
  missing = np.array([[[0, -1], [0, 2]]])
  assert metrics.expected_coverage_at_k(answer_p, missing, 2)[0] == 0.5
  np.testing.assert_allclose(metrics.top_mass([[0.1, 0.5, 0.2, 0.0]], 2), [0.7])


def test_distribution_summary_by_hand():
  # 2 prompts x 1 generation x 2 answers. Row 2 has an invalid format.
  out = metrics.distribution_summary(
    answer_p=np.array([[0.3, 0.0], [0.4, 0.2]]),
    answer_key=np.array([[0, 1], [2, 3]]),
    format_ok=np.array([1, 0]),
    confidence=np.array([[0.1, 0.2], [0.9, 0.9]]),
    probs=np.array([[0.6, 0.3, 0.1], [0.4, 0.3, 0.3]]),
    group_size=1,
    ks=[2],
    calibrated=True,
  )
  assert out["dist/coverage"] == pytest.approx((0.3 + 0.0) / 2)
  assert out["dist/oracle_coverage"] == pytest.approx((0.9 + 0.7) / 2)
  # top answer by confidence: slot 2 of row 1 (p 0); row 2 invalid (0)
  assert out["dist/top1_p"] == 0.0
  assert out["dist/max_p"] == pytest.approx(0.5)
  # |0.1 - 0.3| and |0.2 - 0| over the valid row's two answers
  assert out["dist/conf_abs_err"] == pytest.approx(0.2)
  assert out["dist/conf_mean_err"] == pytest.approx(0.2)  # G = 1: q̄ = q
  assert out["dist/conf_spread"] == 0.0


def test_confidence_error_splits_into_mean_and_spread_by_hand():
  # One prompt, G = 2 generations of A = 2 answers; answer key 0 is stated
  # twice (q 0.3 and 0.5, p 0.4: its mean is right, each sample 0.1 off).
  out = metrics.distribution_summary(
    answer_p=np.array([[0.4, 0.0], [0.4, 0.1]]),
    answer_key=np.array([[0, 1], [0, 2]]),
    format_ok=np.array([1, 1]),
    confidence=np.array([[0.3, 0.1], [0.5, 0.2]]),
    probs=np.array([[0.4, 0.1, 0.5]]),
    group_size=2,
    ks=[2],
    calibrated=True,
    train_p=np.array([[0.3, 0.0], [0.3, 0.2]]),  # training frequencies p̂
  )
  # |q - p̂|: 0, 0.1, 0.2, 0 and |p̂ - p|: 0.1, 0, 0.1, 0.1
  assert out["dist/conf_train_err"] == pytest.approx(0.3 / 4)
  assert out["dist/conf_train_floor"] == pytest.approx(0.3 / 4)
  assert out["dist/conf_abs_err"] == pytest.approx((0.1 + 0.1 + 0.1 + 0.1) / 4)
  # |q̄ - p|: key 0 0, key 1 0.1, key 2 0.1 (each answer counted)
  assert out["dist/conf_mean_err"] == pytest.approx((0 + 0.1 + 0 + 0.1) / 4)
  # |q - q̄|: key 0's two samples 0.1 each, keys 1 and 2 stated once
  assert out["dist/conf_spread"] == pytest.approx((0.1 + 0 + 0.1 + 0) / 4)


def test_passk_optimum_against_brute_force():
  """The water-filling optimum of Σ p(x)(1 − (1 − π(x))^k) equals the best
  point of a fine grid over the 3-answer simplex; it repeats mass over
  more answers than k when p is flat (unlike the top-k set)."""
  grid = np.arange(0, 1.0005, 0.005)
  a, b = np.meshgrid(grid, grid)
  ok = a + b <= 1 + 1e-12
  pis = np.stack([a[ok], b[ok], np.clip(1 - a[ok] - b[ok], 0, 1)], -1)
  for p in ([0.5, 0.3, 0.2], [0.7, 0.2, 0.1], [0.9, 0.1, 0.0]):
    for k in (1, 2, 3, 5):
      best = np.max(np.sum(np.asarray(p) * (1 - (1 - pis) ** k), -1))
      value, pi = metrics.passk_optimum(p, k)
      assert value == pytest.approx(best, abs=2e-4)
      assert value >= best - 1e-12 and pi.sum() == pytest.approx(1.0)
  # By hand: p = (0.9, 0.1), k = 2: KKT 0.9(1 − π) = 0.1·π → π = (0.9, 0.1),
  # F = 0.9·(1 − 0.01) + 0.1·(1 − 0.81) = 0.91.
  value, pi = metrics.passk_optimum([0.9, 0.1, 0.0], 2)
  assert value == pytest.approx(0.91) and pi == pytest.approx([0.9, 0.1, 0])
  # Single-answer summaries carry it per k; the top-k mass is above it.
  out = metrics.distribution_summary(
    answer_p=np.array([[0.5], [0.3], [0.5]]),
    answer_key=np.array([[0], [1], [0]]),
    format_ok=np.array([1, 1, 1]),
    confidence=np.full((3, 1), np.nan),
    probs=np.array([[0.5, 0.3, 0.2]]),
    group_size=3,
    ks=[3],
    calibrated=False,
  )
  assert out["dist/passk_optimum@3"] == pytest.approx(0.73322, abs=1e-5)
  assert out["dist/oracle@3"] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="k >= 1"):
    metrics.passk_optimum([0.5, 0.5], 0)


def test_answer_probs_matches_answers_to_the_distribution():
  meta = {"distribution": {"answers": ["asthma", "croup"], "probs": [0.7, 0.3]}}
  cfg = reward.RewardConfig(
    mode="multi_rlvr", num_answers=2, require_think=False
  )
  texts = [
    "<answer1>Croup</answer1><answer2>lupus</answer2>",
    "<answer1>asthma</answer1>",  # one answer missing
  ]
  (out,) = rollouts.answer_probs(texts, [meta, meta], cfg)
  np.testing.assert_allclose(out, [[0.3, 0.0], [0.7, 0.0]])


def test_warmup_distribution_targets():
  rng = np.random.default_rng(0)
  rec = _decoded("train")[0]
  wc = warmup.WarmupConfig(answers="distribution", confidences="random")
  cfg = reward.RewardConfig(
    mode="multi_rlcr", num_answers=3, require_think=False
  )
  sums = []
  for _ in range(200):
    text = warmup.target_text(
      rec["answers"], [], "multi_rlcr", 3, rng, wc, rec["meta"]
    )
    parsed = parsing.parse(text, cfg)
    assert parsed.format_ok, parsed.error
    assert len(set(parsed.answers)) == 3
    assert set(parsed.answers) <= set(distlab.NAMES)
    q = np.array(parsed.confidences)
    np.testing.assert_allclose(q * 20, np.round(q * 20), atol=1e-6)
    sums.append(q.sum())
  assert max(sums) < 1.0
  with pytest.raises(ValueError, match="distribution"):
    warmup.target_text([["x"]], [], "multi_rlcr", 3, rng, wc, {})


def test_warmup_distribution_prefers_likely_answers():
  rng = np.random.default_rng(1)
  rec = _decoded("train")[0]
  dist = rec["meta"]["distribution"]
  wc = warmup.WarmupConfig(answers="distribution", flatten=0.5)
  cfg = reward.RewardConfig(mode="rlvr", require_think=False)
  counts = collections.Counter(
    parsing.parse(
      warmup.target_text([], [], "rlvr", 1, rng, wc, rec["meta"]), cfg
    ).answers[0]
    for _ in range(3000)
  )
  # weight (p + w)^τ: the mode is drawn more often than the least likely
  # plausible answer, which is drawn more often than one distractor
  distractor = rec["meta"]["distractors"][0]
  assert counts[dist["answers"][0]] > counts[dist["answers"][-1]]
  assert counts[dist["answers"][-1]] > counts[distractor]


def _eval_file(tmp_path, name, mode, seed, coverage, unique):
  path = tmp_path / name / "eval"
  path.mkdir(parents=True)
  a = 1 if mode == "rlvr" else 3
  summary = {
    "dist/coverage": coverage,
    "dist/oracle_coverage": 0.77,
    "dist/top1_p": 0.3,
    "dist/max_p": 0.35,
    "unique@30": unique,
    "tokens_per_distinct_correct": float("inf"),
  }
  summary.update({f"dist/coverage@{k}": coverage for k in range(a, 31, a)})
  summary.update({f"dist/oracle@{k}": 0.8 for k in range(a, 31, a)})
  (path / "after.json").write_text(
    json.dumps(
      {
        "mode": mode,
        "seed": seed,
        "num_answers": 3,
        "summary": summary,
        "details": {"budget": 30, "unique": [unique] * 4},
      }
    ).replace("Infinity", "null")
  )
  return str(tmp_path / name)


def test_compare_groups_seeds_and_writes_the_report(tmp_path):
  runs = {
    "rlvr_s0": _eval_file(tmp_path, "a", "rlvr", 0, 0.3, 1),
    "rlvr_s1": _eval_file(tmp_path, "b", "rlvr", 1, 0.34, 2),
    "multi_rlvr_s0": _eval_file(tmp_path, "c", "multi_rlvr", 0, 0.7, 3),
  }
  out = compare.write_comparison(runs, str(tmp_path / "cmp"))
  data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
  assert set(data["runs"]) == set(runs)
  r = data["runs"]["rlvr_s1"]
  assert (r["mode"], r["seed"], r["coverage"]) == ("rlvr", 1, 0.34)
  assert r["recall@k"]["30"] == 0.34 and r["oracle_coverage"] == 0.77
  assert r["tokens_per_distinct_correct"] is None
  md = (tmp_path / "cmp" / "compare.md").read_text()
  assert "| rlvr | rlvr | 0,1 | 0.320 [0.300, 0.340]" in md
  assert "| multi_rlvr | multi_rlvr | 0 | 0.700" in md
  for png in ("recall_at_k.png", "unique_answers.png"):
    assert (tmp_path / "cmp" / png).stat().st_size > 1000
  assert out["multi_rlvr_s0"]["unique@30"] == 3


def test_compare_judges_a_passk_run_by_its_own_optimum(tmp_path):
  path = _eval_file(tmp_path, "p", "rlvr", 0, 0.6, 3)
  f = os.path.join(path, "eval", "after.json")
  rec = json.loads(open(f).read())
  rec["pass_k"] = 3
  rec["summary"]["dist/coverage@3"] = 0.58
  rec["summary"]["dist/passk_optimum@3"] = 0.62
  open(f, "w").write(json.dumps(rec))
  row = compare.row(compare.load(path))
  assert (row["pass_k"], row["coverage"], row["oracle_coverage"]) == (
    3, 0.58, 0.62,
  )  # fmt: skip
  plain = _eval_file(tmp_path, "q", "rlvr", 0, 0.3, 1)
  plain = compare.row(compare.load(plain))
  assert (plain["pass_k"], plain["coverage"]) == (None, 0.3)


def test_compare_errors_name_the_problem(tmp_path):
  with pytest.raises(ValueError, match="not NAME=DIR"):
    compare.parse_runs("a=x,b")
  with pytest.raises(FileNotFoundError, match="no evaluation found"):
    compare.write_comparison({"a": str(tmp_path)}, str(tmp_path / "out"))
  (tmp_path / "eval.json").write_text("{broken")
  with pytest.raises(ValueError, match="unreadable evaluation"):
    compare.write_comparison({"a": str(tmp_path)}, str(tmp_path / "out"))


# ---------------------------------------------------------------------------
# Learning test: the objectives reach their predicted behaviour

STEPS = 200
LR = 1e-3
RLCR_STEPS = 300  # Multi-RLCR: confidences take longer than answers


def _train_arm(arm, workdir, seed=0, steps=None, lr=None):
  """Warm-up + STEPS RL steps of configs/lab.py:ARM on the small lab;
  returns the (after warm-up, after RL) evaluation summaries."""
  from configs import lab
  from multians_jax import loop

  c = lab.get_config(arm)
  c.seed = seed
  arm_steps = c.steps
  c.steps, c.optim.lr = steps or STEPS, lr or LR
  if c.loss.entropy_decay_steps:  # the arm's schedule, scaled to c.steps
    c.loss.entropy_decay_steps = (
      c.steps * c.loss.entropy_decay_steps // arm_steps
    )
  # The other arms' 2 x 64 decoder for every arm: multi_rlcr's own 4 x 128
  # one lost the format within 180 steps at LR and reached 0.34 of the
  # oracle in 600 steps (about 4 min) at the arm's 3e-4. Its confidence
  # step (rl.conf_adv_scale = 10) at LR lost the format by step 54 (seed
  # 3): the check runs the credit with λ = 1.
  c.model.arch.update(lab.get_config("multi_rlvr").model.arch)
  c.rl.conf_adv_scale = 1.0
  c.warmup.steps, c.warmup.lr = 200, 3e-3
  c.eval.num_prompts = 32  # the small lab's whole test split
  c.ckpt.every_steps = 10_000
  out = loop.train(
    RunConfig.from_dict(c.to_dict()),
    str(workdir),
    train_source=_decoded("train"),
    eval_source=_decoded("test"),
    tokenizer=distlab.tokenizer(),
  )
  return out["warmup"], out["after"]


# Thresholds (METHOD §11): each figure measured over seeds 0-7 with
# tests/measure_margins.py lab (2026-12-06, AMD EPYC, 200 warm-up + 200 RL
# steps at lr 1e-3), as mean ± seed-to-seed sd [min, max]; every threshold
# is at least 3 sd beyond the worst seed. An Intel Xeon (AVX-512) run of the
# same code reached coverage 0.74 of the oracle, inside this spread.
MULTI = dict(
  warm_unique=8.0,  # 15.59 ± 0.28 [15.16, 15.97]
  rise=0.10,  # coverage − warm-up's: 0.43 ± 0.07 [0.31, 0.53]; 3.2 sd
  of_oracle=0.50,  # coverage / oracle: 0.81 ± 0.07 [0.71, 0.92]; 3.2 sd
  unique=2.2,  # unique@30: 4.27 ± 0.45 [3.63, 4.88]; 3.2 sd
)
SINGLE = dict(
  warm_unique=8.0,  # 15.11 ± 0.58 [14.34, 15.78]
  unique=5.0,  # unique@30: 2.09 ± 0.48 [1.53, 3.19]; 3.7 sd (warm-up: 15)
  top1_rise=0.03,  # top-1 answer's p − warm-up's: 0.21 ± 0.03 [0.14, 0.23]
)
# coverage of Multi-RLVR − RLVR's: 0.32 ± 0.04 [0.28, 0.39]; 3.6 sd
MULTI_OVER_SINGLE = 0.15


# Multi-RLCR: its arm's credit (decoupled, λ = 1) and entropy bonus
# (decaying over the first 3/4 of the steps) on the 2 x 64 decoder,
# RLCR_STEPS steps;
# seeds 0-4 with tests/measure_margins.py lab_rlcr (2026-12-07, AMD EPYC).
# With the confidence tokens' advantage set to 0 (the broken credit below)
# mean |q − p| ends at 0.25 and 0.28 (seeds 0, 1), above the warm-up's.
RLCR = dict(
  rise=0.12,  # coverage − warm-up's: 0.32 ± 0.05 [0.28, 0.37]; 3.3 sd
  of_oracle=0.45,  # coverage / oracle: 0.67 ± 0.05 [0.62, 0.72]; 3.5 sd
  conf_err=0.13,  # |q − p|: 0.094 ± 0.008 [0.084, 0.101] (warm-up 0.21)
)


def _check_rlcr(w, a):
  """Multi-RLCR: K plausible answers, confidences near their p."""
  assert a["dist/coverage"] - w["dist/coverage"] > RLCR["rise"], (w, a)
  of_oracle = a["dist/coverage"] / a["dist/oracle_coverage"]
  assert of_oracle > RLCR["of_oracle"], a
  assert a["dist/conf_abs_err"] < RLCR["conf_err"], (w, a)


def _check_multi(mw, ma):
  """Multi-RLVR: from a broad prior to near the top-K mass, K distinct."""
  assert mw["unique@30"] > MULTI["warm_unique"], mw  # a broad prior
  rise = ma["dist/coverage"] - mw["dist/coverage"]
  assert rise > MULTI["rise"], (mw, ma)
  of_oracle = ma["dist/coverage"] / ma["dist/oracle_coverage"]
  assert of_oracle > MULTI["of_oracle"], ma
  assert ma["unique@30"] > MULTI["unique"], ma


def _check_single(sw, sa):
  """RLVR: collapses onto one answer, nearer the mode (METHOD §9)."""
  assert sw["unique@30"] > SINGLE["warm_unique"], sw
  assert sa["unique@30"] < SINGLE["unique"], sa
  assert sa["dist/top1_p"] > sw["dist/top1_p"] + SINGLE["top1_rise"], (sw, sa)


@pytest.mark.slow
def test_multi_rlvr_covers_the_top_set_and_rlvr_collapses(tmp_path):
  (mw, ma) = _train_arm("multi_rlvr", tmp_path / "m")
  (sw, sa) = _train_arm("rlvr", tmp_path / "s")
  _check_multi(mw, ma)
  _check_single(sw, sa)
  over = ma["dist/coverage"] - sa["dist/coverage"]
  assert over > MULTI_OVER_SINGLE, (ma, sa)


@pytest.mark.slow
def test_multi_rlcr_covers_the_top_set_with_calibrated_confidences(tmp_path):
  _check_rlcr(*_train_arm("multi_rlcr", tmp_path, steps=RLCR_STEPS))


@pytest.mark.slow
@pytest.mark.parametrize(
  "broken, arm",
  [
    ("constant_reward", "multi_rlvr"),
    ("no_update", "rlvr"),
    ("no_calibration_credit", "multi_rlcr"),
  ],
)
def test_learning_test_fails_when_reward_or_update_is_broken(
  tmp_path, monkeypatch, broken, arm
):
  """The learning test's assertions fail with the reward replaced by a
  constant (advantages all zero), with an update step that leaves the
  parameters as they are, or with decoupled credit that gives the
  confidence tokens no advantage (one arm each, to keep the suite short)."""
  import jax.numpy as jnp

  from multians_jax import loop
  from multians_jax.rl import advantage, credit

  calls = []
  if broken == "no_calibration_credit":  # confidence spans take 0
    real_decoupled = credit._decoupled

    def no_cal(scores, p, kind, baseline, token_slot, *rest):
      calls.append(1)
      adv, info = real_decoupled(scores, p, kind, baseline, token_slot, *rest)
      conf = np.asarray(token_slot) >= np.asarray(scores.slot).shape[1]
      return np.where(conf, 0.0, adv).astype(np.float32), info

    monkeypatch.setattr(credit, "_decoupled", no_cal)
  elif broken == "constant_reward":  # what the loop's advantages read
    real = advantage.advantages

    def constant(r, kind, **kw):
      calls.append(1)
      return real(jnp.ones_like(r), kind, **kw)

    monkeypatch.setattr(advantage, "advantages", constant)
  else:

    def frozen(g, state, b, tx, cfg):
      calls.append(1)
      keys = ("loss", "token_ratio_mean", "logp_diff_mean", "logp_diff_max")
      return state, dict.fromkeys(keys, 0.0)

    monkeypatch.setattr(loop.update_lib, "update_step", frozen)
  steps = RLCR_STEPS if arm == "multi_rlcr" else STEPS
  warm, after = _train_arm(arm, tmp_path / arm, steps=steps)
  assert len(calls) >= steps  # the broken piece is the one the loop runs
  check = {"multi_rlvr": _check_multi, "multi_rlcr": _check_rlcr}.get(
    arm, _check_single
  )
  with pytest.raises(AssertionError):
    check(warm, after)


# ---------------------------------------------------------------------------
# tools/evaluate.py --config scores as training does

ROOT = __import__("os").path.dirname(
  __import__("os").path.dirname(__import__("os").path.abspath(__file__))
)
LAB_OVERRIDES = (
  "--config.steps=3",
  "--config.warmup.steps=100",
  "--config.eval.num_prompts=8",
  "--config.eval.num_generations=3",
)


def _py(*args, check=True):
  import subprocess
  import sys

  return subprocess.run(
    [sys.executable, *args],
    cwd=ROOT,
    check=check,
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.mark.slow
def test_evaluate_with_the_run_config_reproduces_training_eval(tmp_path):
  work, data = tmp_path / "run", tmp_path / "data"
  cfg = "--config=configs/lab.py:multi_rlcr"
  extra = (*LAB_OVERRIDES, f"--config.data.data_dir={data}")
  _py("-m", "multians_jax.main", cfg, f"--workdir={work}", *extra)
  _py(
    "tools/evaluate.py", f"--model={work}", cfg, *extra, f"--out={tmp_path}/e"
  )
  train = json.loads((work / "eval" / "after.json").read_text())["summary"]
  tool = json.loads((tmp_path / "e" / "eval.json").read_text())["summary"]
  assert train == tool
  assert "reward/total" in tool and "dist/conf_abs_err" in tool
  bad = _py(
    "tools/evaluate.py", f"--model={work}", cfg, "--config.rl.advantage=x",
    f"--out={tmp_path}/e2", check=False,
  )  # fmt: skip
  assert bad.returncode != 0 and "evaluate: config: rl.advantage" in bad.stderr


def test_study_skips_finished_runs_compares_and_exports(tmp_path):
  out = tmp_path / "study"
  _eval_file(out, "rlvr_s0", "rlvr", 0, 0.3, 1)
  _eval_file(out, "rlvr_s1", "rlvr", 1, 0.34, 2)
  (out / "rlvr_s0" / "metrics.jsonl").write_text('{"step": 1}\n')
  res = _py(
    "tools/study.py", "--config=configs/lab.py", "--arms=rlvr",
    "--seeds=0,1", f"--out={out}", f"--export={tmp_path}/keep",
  )  # fmt: skip
  assert "2 of 2 runs done" in res.stdout
  data = json.loads((out / "compare" / "compare.json").read_text())
  assert set(data["runs"]) == {"rlvr_s0", "rlvr_s1"}
  keep = tmp_path / "keep"
  assert (keep / "rlvr_s0" / "metrics.jsonl").read_text() == '{"step": 1}\n'
  assert (keep / "rlvr_s1" / "eval" / "after.json").exists()
  assert (keep / "compare" / "compare.md").exists()
