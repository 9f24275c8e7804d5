"""Parser, matchers, config validation, properness and parser properties."""

import itertools
import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multians_jax.data import prompts
from multians_jax.rl import matchers, parsing, reward


def _paper(**kw):
  """The paper's reward (the hand-computed figures below use it)."""
  return reward.RewardConfig(**{**reward.PAPER, **kw})


CFG = _paper(mode="multi_rlcr", num_answers=3)


def _good(**kw):
  confs = kw.pop("confs", [0.5, 0.3, 0.2])
  answers = ["a1", "b2", "c3"]
  return prompts.format_completion("multi_rlcr", answers, confs, **kw)


# ------------------------------------------------------------------ parser


def test_parse_well_formed_and_grouped_layouts():
  p = parsing.parse(_good(), CFG)
  assert p.format_ok and p.answers == ("a1", "b2", "c3")
  assert p.confidences == (0.5, 0.3, 0.2)
  grouped = (
    "<think>t</think>\n<answer1>x</answer1><answer2>y</answer2>"
    "<answer3>z</answer3>\n<analysis>a</analysis><confidence1>0.1"
    "</confidence1><confidence2>0.2</confidence2><confidence3>0.3"
    "</confidence3>"
  )
  p = parsing.parse(grouped, CFG)
  assert p.format_ok and p.answers == ("x", "y", "z")
  assert p.confidences == (0.1, 0.2, 0.3)


@pytest.mark.parametrize(
  "text,reason",
  [
    (_good().replace("<think>...</think>", ""), "missing <think>"),
    (_good(think="  "), "empty <think>"),
    (_good().replace("</answer2>", ""), "unbalanced|not closed"),
    (_good().replace("b2", " "), "empty answer"),
    (_good(confs=[0.5, 1.5, 0.1]), "invalid confidence"),
    (_good(confs=[0.5, "nan", 0.1]), "invalid confidence"),
    (_good(confs=[0.5, "inf", 0.1]), "invalid confidence"),
    (_good(confs=[0.5, "-0.2", 0.1]), "invalid confidence"),
    (_good(confs=[0.5, "70%", 0.1]), "invalid confidence"),
    (_good() + "<answer1>again</answer1>", "order"),
    (_good(think="<answer1>x</answer1>"), "not closed"),
    (_good().replace("<analysis>...</analysis>", ""), "<analysis>"),
    (_good() + " trailing words", "outside"),
    ("", "missing <think>"),
  ],
)
def test_parse_rejects(text, reason):
  p = parsing.parse(text, CFG)
  assert not p.format_ok
  assert re.search(reason, p.error), p.error


def test_percent_and_require_think_options():
  pct = _paper(accept_percent=True)
  p = parsing.parse(_good(confs=["70%", "20 %", "0.1"]), pct)
  assert p.format_ok
  np.testing.assert_allclose(p.confidences, [0.7, 0.2, 0.1])
  no_think = _good(think=None)
  assert not parsing.parse(no_think, CFG).format_ok
  lax = _paper(require_think=False)
  assert parsing.parse(no_think, lax).format_ok


def test_single_answer_modes():
  rlcr = _paper(mode="rlcr")
  text = prompts.format_completion("rlcr", ["Paris"], [0.9])
  p = parsing.parse(text, rlcr)
  assert p.format_ok and p.answers == ("Paris",) and p.confidences == (0.9,)
  # rlcr wants analysis before confidence.
  swapped = "<think>t</think><answer>Paris</answer><confidence>0.9</confidence>"
  assert not parsing.parse(swapped + "<analysis>a</analysis>", rlcr).format_ok
  rlvr = _paper(mode="rlvr")
  p = parsing.parse("<think>t</think> <answer>Paris</answer>", rlvr)
  assert p.format_ok and math.isnan(p.confidences[0])


def test_parse_never_raises_on_non_strings():
  for bad in (None, 3, b"<think>", ["x"]):
    assert not parsing.parse(bad, CFG).format_ok


# ----------------------------------------------------------------- matchers


def test_exact_matcher_normalises():
  gold = [["United States", "USA"], ["The Netherlands"]]
  assert matchers.exact_match("the united states!", gold) == 0
  assert matchers.exact_match("U.S.A.", gold) == 0
  assert matchers.exact_match("netherlands", gold) == 1
  assert matchers.exact_match("Canada", gold) == -1
  assert matchers.exact_match("   ", gold) == -1
  assert matchers.normalize_answer("  An  Apple, a day.") == "apple day"


def test_numeric_matcher():
  gold = [["1,000"], ["0.75"], ["Seven"]]
  assert matchers.numeric_match("1000.0", gold) == 0
  assert matchers.numeric_match("3/4", gold) == 1
  assert matchers.numeric_match("The answer is $1,000.", gold) == 0
  assert matchers.numeric_match("0.7500001", gold) == 1
  assert matchers.numeric_match("0.76", gold) == -1
  assert matchers.numeric_match("seven", gold) == 2
  assert matchers.numeric_key("1,000") == matchers.numeric_key("1000.00")


def test_a_custom_matcher_is_an_object_not_a_registration():
  first = matchers.Matcher(
    lambda a, g, t: 0 if a[:1] == "x" else -1, key=str.lower
  )
  cfg = _paper(mode="multi_rlvr", matcher=first)
  text = "<think>t</think><answer1>xa</answer1><answer2>XA</answer2>"
  text += "<answer3>b</answer3>"
  out = reward.score_texts([text], [[["anything"]]], cfg)
  assert out.correct.tolist() == [[1, 0, 0]]
  assert out.distinct.tolist() == [0]  # "xa" and "XA" share a key
  assert "first" not in matchers.MATCHERS  # nothing global changed
  assert matchers.Matcher(first.match).key("The Cat") == "cat"  # default
  with pytest.raises(ValueError, match="nope"):
    _paper(matcher="nope")
  with pytest.raises(ValueError, match="callable"):
    matchers.Matcher(3)


@pytest.mark.parametrize(
  "field,value",
  [
    ("mode", "multi"),
    ("num_answers", 0),
    ("correctness", "all"),
    ("preset", "custom"),
    ("require_distinct", 1),
    ("format_penalty", float("nan")),
    ("weights", (1.0, 2.0)),
    ("matcher", ""),
  ],
)
def test_config_errors_name_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    _paper(**{field: value})


def test_score_texts_hand_computed():
  gold = [[["Paris"]], [["Paris"]]]
  cfg = _paper(mode="rlcr")
  texts = [
    prompts.format_completion("rlcr", ["paris"], [0.8]),
    prompts.format_completion("rlcr", ["Lyon"], [0.8]),
  ]
  out = reward.score_texts(texts, gold, cfg)
  np.testing.assert_allclose(out.total, [1 - 0.04, -0.64], rtol=1e-6)
  ref = _paper(mode="rlcr", preset="reference")
  out = reward.score_texts(texts, gold, ref)
  np.testing.assert_allclose(out.total, [0.5 + 0.5 + 0.48, 0.5 + 0.18])
  with pytest.raises(ValueError, match="gold"):
    reward.score_texts(texts, gold[:1], cfg)


# --------------------------------------------------------------- properness


def _expected_reward(p_outcomes, qs, k, sum_gate):
  """E[R] over outcome vectors c (with probabilities) for each q row."""
  cs, probs = p_outcomes
  n_q, n_c = len(qs), len(cs)
  ids = np.where(np.repeat(cs[None], n_q, 0) > 0, np.arange(k), -1)
  conf = np.repeat(qs[:, None], n_c, 1)
  out = reward.set_reward_kernel(
    ids.reshape(-1, k).astype(np.int32),
    np.tile(np.arange(k, dtype=np.int32), (n_q * n_c, 1)),
    conf.reshape(-1, k).astype(np.float32),
    np.ones(n_q * n_c, bool),
    mode="multi_rlcr",
    confidence_sum_le_one=sum_gate,
  )
  return (np.asarray(out.total).reshape(n_q, n_c) * probs).sum(1)


def _grid(k):
  g = np.round(np.arange(0, 1.0001, 0.1), 2)
  return np.array(list(itertools.product(g, repeat=k)))


def test_properness_independent_answers():
  p = np.array([0.7, 0.2, 0.5])
  cs = np.array(list(itertools.product([0, 1], repeat=3)))
  probs = np.prod(np.where(cs, p, 1 - p), axis=1)
  qs = _grid(3)
  er = _expected_reward((cs, probs), qs, 3, sum_gate=False)
  np.testing.assert_allclose(qs[np.argmax(er)], p)
  want = p.sum() - (p * (1 - p)).sum() / 3  # METHOD §3 closed form
  assert er.max() == pytest.approx(want, abs=1e-5)
  # Σp = 1.4 > 1: the sum gate makes honest confidences a bad choice.
  er_gated = _expected_reward((cs, probs), qs, 3, sum_gate=True)
  assert not np.allclose(qs[np.argmax(er_gated)], p)
  assert er_gated.max() > er_gated[np.argmin(np.abs(qs - p).sum(1))] + 0.1


def test_properness_single_truth_with_sum_gate():
  p = np.array([0.5, 0.3, 0.1])  # mutually exclusive: at most one correct
  cs = np.vstack([np.eye(3), np.zeros((1, 3))])
  probs = np.append(p, 1 - p.sum())
  qs = _grid(3)
  er = _expected_reward((cs, probs), qs, 3, sum_gate=True)
  np.testing.assert_allclose(qs[np.argmax(er)], p)


# ----------------------------------------------------- property-based tests

_PIECES = list("<>/ 0123456789.%-e\nabc") + [
  "<think>",
  "</think>",
  "<answer1>",
  "</answer1>",
  "<answer>",
  "</answer>",
  "<confidence1>",
  "</confidence1>",
  "<confidence>",
  "</confidence2>",
  "<analysis>",
  "</analysis>",
  "nan",
  "inf",
  "é",
  "🙂",
]
_TAGGY = st.lists(st.sampled_from(_PIECES), max_size=80).map("".join)


def _bounds(cfg):
  k = cfg.slots
  top = {"count": k, "count_over_k": 1.0, "any": 1.0}[cfg.correctness]
  if cfg.preset == "reference":
    hi = sum(cfg.weights[:2]) * max(top, 1) + cfg.weights[2]
    return 0.0, hi
  lo = -1.0 if prompts.has_confidence(cfg.mode) else 0.0
  return min(lo, cfg.format_penalty), max(top, cfg.format_penalty)


_CFGS = st.builds(
  reward.RewardConfig,
  mode=st.sampled_from(prompts.MODES),
  num_answers=st.integers(1, 4),
  correctness=st.sampled_from(reward.CORRECTNESS),
  preset=st.sampled_from(reward.PRESETS),
  require_distinct=st.booleans(),
  confidence_sum_le_one=st.booleans(),
  require_think=st.booleans(),
  accept_percent=st.booleans(),
  format_penalty=st.sampled_from([0.0, -1.0]),
)

_SETTINGS = settings(
  max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_SETTINGS
@given(st.one_of(_TAGGY, st.text(max_size=300)), _CFGS)
def test_parse_never_raises_and_rewards_in_bounds(text, cfg):
  p = parsing.parse(text, cfg)
  assert len(p.answers) == cfg.slots == len(p.confidences)
  out = reward.score_texts([text, _good()], [[["a1"]], [["a1"]]], cfg)
  lo, hi = _bounds(cfg)
  assert np.all(np.isfinite(out.total))
  assert np.all(out.total >= lo - 1e-6) and np.all(out.total <= hi + 1e-6)


_ANSWER = st.text(
  alphabet=st.characters(exclude_characters="<>", exclude_categories=["Cs"]),
  min_size=1,
  max_size=20,
).filter(lambda s: s.strip())


@_SETTINGS
@given(
  st.sampled_from(prompts.MODES),
  st.lists(_ANSWER, min_size=1, max_size=4),
  st.lists(st.floats(0, 1), min_size=4, max_size=4),
)
def test_well_formed_round_trip(mode, answers, confs):
  if not prompts.is_multi(mode):
    answers = answers[:1]
  k = len(answers)
  cfg = _paper(mode=mode, num_answers=k)
  conf_text = [repr(q) for q in confs[:k]]
  text = prompts.format_completion(mode, answers, conf_text)
  p = parsing.parse(text, cfg)
  assert p.format_ok, p.error
  assert p.answers == tuple(a.strip() for a in answers)
  if prompts.has_confidence(mode):
    assert p.confidences == tuple(confs[:k])
