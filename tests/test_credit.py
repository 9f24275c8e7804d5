"""Per-answer credit: the kernel's slot parts, slot advantages, token spans
and the [B, L] advantages the update step reads, all by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from multians_jax.config import RunConfig
from multians_jax.data import prompts
from multians_jax.data.datasets import distlab
from multians_jax.model import sampler
from multians_jax.rl import advantage, credit, reward

RLCR = "<analysis>x</analysis>\n" + "\n".join(
  f"<answer{i}>{{}}</answer{i}>\n<confidence{i}>{{}}</confidence{i}>"
  for i in (1, 2, 3)
)


def _cfg(**kw):
  base = dict(
    mode="multi_rlcr",
    num_answers=3,
    correctness="count",
    preset="paper",
    confidence_sum_le_one=False,
    require_think=False,
  )
  return reward.RewardConfig(**{**base, **kw})


def _rlcr(a, q):
  return RLCR.format(*[x for pair in zip(a, q, strict=True) for x in pair])


# ------------------------------------------------------------ kernel parts


def test_slot_parts_paper_by_hand():
  gold = [[["paris"], ["oslo"]]] * 3
  texts = [
    _rlcr(["paris", "rome", "oslo"], [0.5, 0.2, 0.1]),
    _rlcr(["paris", "paris", "oslo"], [0.5, 0.2, 0.1]),  # not distinct
    "no format",
  ]
  sc = reward.score_texts(texts, gold, _cfg())
  # slot i: first_i - (q_i - c_i)^2 / 3
  want = [1 - 0.25 / 3, -0.04 / 3, 1 - 0.81 / 3]
  np.testing.assert_allclose(sc.slot[0], want, atol=1e-6)
  np.testing.assert_allclose(sc.slot[0].sum(), sc.total[0], atol=1e-6)
  np.testing.assert_array_equal(sc.decomposable, [1, 0, 0])
  # no decomposition (gate, format): the total split evenly between slots
  np.testing.assert_allclose(sc.total[1:], [-1.0, 0.0])
  np.testing.assert_allclose(sc.slot[1], [-1 / 3] * 3, atol=1e-6)
  np.testing.assert_array_equal(sc.slot[2], 0)


def test_slot_parts_reference_count_over_k_and_gate():
  w = (0.5, 0.25, 0.75)
  cfg = _cfg(preset="reference", correctness="count_over_k", weights=w)
  gold = [[["paris"], ["oslo"]]] * 2
  texts = [
    _rlcr(["paris", "rome", "lima"], [0.5, 0.2, 0.1]),
    _rlcr(["paris", "rome", "lima"], [0.5, 0.4, 0.3]),  # Σq = 1.2
  ]
  sc = reward.score_texts(texts, gold, cfg)
  sq = np.array([0.25, 0.04, 0.01]) / 3
  want = 0.25 * np.array([1, 0, 0]) / 3 + 0.75 * (1 / 3 - sq)
  np.testing.assert_allclose(sc.slot[0], want, atol=1e-6)
  # total = w_f * f + Σ slot: the format term is shared by the sequence
  np.testing.assert_allclose(sc.total[0], 0.5 + want.sum(), atol=1e-6)
  gated = reward.score_texts(texts, gold, _cfg(confidence_sum_le_one=True))
  np.testing.assert_array_equal(gated.decomposable, [1, 0])


def test_slot_parts_sum_to_total_property():
  """Random completions: the total is the sum of the slot parts (paper) or
  that plus w_f·f (reference); where a row does not decompose, its parts
  are equal."""
  rng = np.random.default_rng(0)
  names = ["paris", "oslo", "rome", "lima", "bern"]
  rlcr, rlvr, gold = [], [], []
  for _ in range(200):
    a = list(rng.choice(names, 3))
    q = np.round(rng.uniform(0, 0.5, 3), 2)
    broken = rng.uniform() < 0.1
    rlcr.append("broken" if broken else _rlcr(a, q))
    rlvr.append(
      "broken"
      if broken
      else "".join(f"<answer{i}>{x}</answer{i}>" for i, x in enumerate(a, 1))
    )
    gold.append([[n] for n in rng.choice(names, 2, replace=False)])
  for preset, w_f in (("paper", 0.0), ("reference", 0.5)):
    for corr in ("count", "count_over_k"):
      for mode, t in (("multi_rlcr", rlcr), ("multi_rlvr", rlvr)):
        cfg = _cfg(
          preset=preset, correctness=corr, mode=mode, format_penalty=-1.0
        )
        sc = reward.score_texts(t, gold, cfg)
        ok = sc.decomposable > 0
        assert 0.3 < ok.mean() < 0.95  # both kinds present
        shared = w_f * sc.format_ok
        np.testing.assert_allclose(sc.slot.sum(1) + shared, sc.total, atol=1e-5)
        bad = sc.slot[~ok]
        np.testing.assert_allclose(bad, bad[:, :1].repeat(3, 1), atol=1e-6)
        assert (sc.slot[ok] != sc.slot[ok][:, :1]).any()


def test_any_is_not_decomposable():
  texts = [_rlcr(["paris", "rome", "oslo"], [0.5, 0.2, 0.1])]
  sc = reward.score_texts(texts, [[["paris"]]], _cfg(correctness="any"))
  assert sc.decomposable[0] == 0
  np.testing.assert_allclose(sc.slot[0], [sc.total[0] / 3] * 3)


# ------------------------------------------------------- slot advantages


def test_slot_advantages_by_hand():
  # one group of G = 3, A = 2
  s = jnp.array([[[1.0, 0.0], [0.0, 0.5], [0.5, 0.4]]])
  got = advantage.slot_advantages(s, "drgrpo")
  want = np.array(s[0]) - np.array([0.5, 0.3])  # per-slot means
  np.testing.assert_allclose(got[0], want, atol=1e-6)
  pooled = advantage.slot_advantages(s, "drgrpo", baseline="pooled")
  np.testing.assert_allclose(pooled[0], np.array(s[0]) - 2.4 / 6, atol=1e-6)
  rloo = advantage.slot_advantages(s, "rloo")
  np.testing.assert_allclose(rloo[0], want * 3 / 2, atol=1e-6)
  grpo = advantage.slot_advantages(s, "grpo")
  std = np.sqrt((want**2).sum(0) / 2)  # unbiased, per slot
  np.testing.assert_allclose(grpo[0], want / (std + 1e-6), atol=1e-5)
  rloo_p = advantage.slot_advantages(s, "rloo", baseline="pooled")
  np.testing.assert_allclose(
    rloo_p[0], (np.array(s[0]) - 0.4) * 6 / 5, atol=1e-6
  )


def test_slot_advantages_no_signal_is_zero():
  s = jnp.array([[[1.0, 0.3], [0.0, 0.3], [0.2, 0.3]]])  # slot 2 constant
  for kind in advantage.KINDS:
    got = advantage.slot_advantages(s, kind)
    np.testing.assert_array_equal(got[0, :, 1], 0)
    assert np.abs(got[0, :, 0]).min() > 0
  flat = jnp.full((1, 3, 2), 0.25)
  np.testing.assert_array_equal(
    advantage.slot_advantages(flat, "grpo", baseline="pooled"), 0
  )
  with pytest.raises(ValueError, match="credit_baseline"):
    advantage.slot_advantages(s, "drgrpo", baseline="row")


# ------------------------------------------------------------ token spans


def _bpe_tokenizer():
  """A byte-level BPE trained here on tagged text with non-ASCII names."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = [
    _rlcr(["São Tomé", "Côte d’Ivoire", "Perú"], [0.5, 0.25, 0.125]),
    _rlcr(["paris", "oslo", "rome"], [0.2, 0.3, 0.4]),
  ] * 20
  trainer = trainers.BpeTrainer(
    vocab_size=400,
    special_tokens=["<pad>", "<eos>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(corpus, trainer)
  return PreTrainedTokenizerFast(
    tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>"
  )


def _oracle_slots(tokenizer, ids, text, cfg):
  """Token char ranges by decoding every prefix; slot = the content span
  a token's range overlaps."""
  ends = [
    len(tokenizer.decode(ids[: n + 1], skip_special_tokens=True))
    for n in range(len(ids))
  ]
  starts = [0] + ends[:-1]
  spans = []
  for i in range(cfg.num_answers):
    for v, tag in ((i, f"answer{i + 1}"), (3 + i, f"confidence{i + 1}")):
      o = text.index(f"<{tag}>") + len(tag) + 2
      spans.append((v, o, text.index(f"</{tag}>")))
  out = []
  for s, e in zip(starts, ends, strict=True):
    hit = [i for i, a, b in spans if s < b and e > a]
    out.append(hit[0] if hit else -1)
  return np.array(out)


@pytest.mark.parametrize("which", ["bpe", "lab"])
def test_row_slots_match_a_prefix_decoding_oracle(which):
  cfg = _cfg()
  if which == "bpe":
    tok = _bpe_tokenizer()
    text = _rlcr(["São Tomé", "Perú", "oslo"], [0.5, 0.25, 0.0])
  else:
    tok = distlab.tokenizer()  # one token per block
    analysis = f"<analysis>{prompts.DEFAULT_ANALYSIS}</analysis>"
    text = _rlcr(distlab.NAMES[:3], ["0.5", "0.25", "0.05"]).replace(
      "<analysis>x</analysis>", analysis
    )
  ids = tok(text, add_special_tokens=False)["input_ids"]
  back = tok.decode(ids, skip_special_tokens=True)
  got = credit.row_slots(tok, ids, back, cfg)
  np.testing.assert_array_equal(got, _oracle_slots(tok, ids, back, cfg))
  assert set(got) == {-1, 0, 1, 2, 3, 4, 5}  # answers 0..2, confidences 3..5
  for i in range(3):  # slot i's tokens decode to text holding its answer
    piece = tok.decode([t for t, s in zip(ids, got, strict=True) if s == i])
    assert text.split(f"<answer{i + 1}>")[1].split("<")[0] in piece


def test_token_slots_rows_and_padding():
  tok = _bpe_tokenizer()
  cfg = _cfg()
  good = _rlcr(["paris", "oslo", "rome"], [0.2, 0.3, 0.4])
  ids = [tok(t, add_special_tokens=False)["input_ids"] for t in (good, "oslo")]
  n = max(map(len, ids)) + 2
  toks = np.zeros((2, n), np.int32)
  for b, row in enumerate(ids):
    toks[b, : len(row)] = row
  roll = sampler.Rollout(
    prompt_tokens=None,
    prompt_mask=None,
    tokens=toks,
    logprobs=None,
    mask=None,
    lengths=np.array([len(r) for r in ids]),
    truncated=None,
  )
  texts = [tok.decode(r) for r in ids]
  got = credit.token_slots(tok, roll, texts, np.array([True, False]), cfg)
  assert (got[0, : len(ids[0])] >= -1).all()
  assert (got[0, len(ids[0]) :] == credit.PAD).all()
  assert (got[1, : len(ids[1])] == credit.SHARED).all()  # format failure
  assert (got[1, len(ids[1]) :] == credit.PAD).all()


# ------------------------------------------------- advantages per token


def test_token_advantages_by_hand():
  seq = jnp.array([1.0, -2.0])
  slot = jnp.array([[0.1, 0.2], [0.3, 0.4]])
  slots = jnp.array([[-1, 0, 1, -2], [0, 1, -1, -2]])
  got = credit.token_advantages(seq, slot, slots, jnp.array([True, False]))
  want = [[1.0, 0.1, 0.2, 1.0], [-2.0, -2.0, -2.0, -2.0]]
  np.testing.assert_allclose(got, want, atol=1e-7)


def test_rollout_advantages_sequence_and_answer():
  # P = 1 group of G = 2, A = 2, L = 3
  scores = reward.Scores(
    total=np.array([1.0, 0.0], np.float32),
    slot=np.array([[1.0, 0.0], [0.0, 0.0]], np.float32),
    decomposable=np.array([1.0, 1.0], np.float32),
  )
  slots = np.array([[-1, 0, 1], [0, 1, -2]], np.int32)
  seq, _ = credit.rollout_advantages(
    scores, 1, kind="drgrpo", credit="sequence"
  )
  np.testing.assert_allclose(seq, [0.5, -0.5])
  adv, info = credit.rollout_advantages(
    scores, 1, kind="drgrpo", credit="answer", token_slot=slots
  )
  # slot 0: parts (1, 0) → ±0.5; slot 1: (0, 0) → no signal, 0
  np.testing.assert_allclose(adv, [[0.5, 0.5, 0.0], [-0.5, 0.0, -0.5]])
  assert info["credit/decomposable_frac"] == 1.0
  assert info["credit/slot_token_frac"] == pytest.approx(4 / 5)
  with pytest.raises(ValueError, match="rl.credit"):
    credit.rollout_advantages(scores, 1, kind="drgrpo", credit="token")


def _decoupled_scores():
  """P = 1 group of G = 3, A = 2, multi_rlcr, paper preset. Row 0: slot 0
  right (q 0.5), slot 1 wrong (q 0.25); row 1: slot 0 wrong (q 0.5), slot 1
  right (q 0.5); row 2: a format failure (R = −1)."""
  return reward.set_reward_kernel(
    jnp.array([[0, -1], [-1, 1], [-1, -1]]),
    jnp.array([[0, 1], [2, 3], [4, 5]]),
    jnp.array([[0.5, 0.25], [0.5, 0.5], [np.nan, np.nan]]),
    jnp.array([True, True, False]),
    mode="multi_rlcr",
    format_penalty=-1.0,
  )


def test_decoupled_credit_by_hand():
  scores = jax.tree.map(np.asarray, _decoupled_scores())
  # Calibration shares −(q − c)² / K: row 0 (−0.125, −0.03125), row 1
  # (−0.125, −0.125); none for the failure. Parts add back to the total.
  np.testing.assert_allclose(
    scores.slot_cal, [[-0.125, -0.03125], [-0.125, -0.125], [0, 0]]
  )
  np.testing.assert_allclose(scores.slot.sum(1), scores.total)
  np.testing.assert_allclose(scores.total, [0.84375, 0.75, -1.0])
  # Token spans: answer i → i, confidence i → 2 + i.
  slots = np.array([[-1, 0, 2, 1, 3, -2]] * 3, np.int32)
  adv, info = credit.rollout_advantages(
    scores, 1, kind="drgrpo", credit="decoupled", token_slot=slots
  )
  seq = np.array([0.84375, 0.75, -1.0]) - (0.84375 + 0.75 - 1.0) / 3
  # Correctness to go (slots i..K): rows (1, 0), (1, 1), failure split
  # evenly (−0.5, −0.5) → (−1, −0.5); column means 1/3 and 1/6.
  acc0 = np.array([1, 1, -1]) - 1 / 3
  acc1 = np.array([0, 1, -0.5]) - 1 / 6
  # Calibration: the failure stands at the valid rows' mean, so slot 0's
  # equal shares give 0 and slot 1's (−0.03125, −0.125) give ±0.046875.
  cal1 = [0.046875, -0.046875, 0.0]
  for g in range(2):
    want = [seq[g], acc0[g], 0.0, acc1[g], cal1[g], seq[g]]
    np.testing.assert_allclose(adv[g], want, atol=1e-6)
  np.testing.assert_allclose(adv[2], seq[2], atol=1e-6)  # no decomposition
  assert info["credit/decomposable_frac"] == pytest.approx(2 / 3)
  # Answer credit reads the same spans: answer and confidence i share
  # slot i's whole part.
  ans, _ = credit.rollout_advantages(
    scores, 1, kind="drgrpo", credit="answer", token_slot=slots
  )
  assert ans[0, 1] == ans[0, 2] and ans[0, 3] == ans[0, 4]


def test_config_rejects_answer_credit_with_any():
  from configs import tiny

  c = tiny.get_config()
  c.rl.credit = "answer"
  c.reward.correctness = "any"
  with pytest.raises(ValueError, match="reward.correctness='any'"):
    RunConfig.from_dict(c.to_dict())
  c.reward.correctness = "count"
  assert RunConfig.from_dict(c.to_dict()).rl.credit == "answer"
  c.rl.credit = "slot"
  with pytest.raises(ValueError, match="rl.credit must be one of"):
    RunConfig.from_dict(c.to_dict())


# ------------------------------------------------------------ GDPO components


@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_reward_components_rebuild_the_total(preset):
  """Under reference, Σ w_k c_k is the total; under paper, f·(acc + cal) is
  (format failures take the penalty instead)."""
  rng = np.random.default_rng(1)
  names = ["paris", "oslo", "rome", "lima"]
  texts, gold = [], []
  for _ in range(120):
    a = list(rng.choice(names, 3))
    q = np.round(rng.uniform(0, 0.6, 3), 2)
    texts.append("broken" if rng.uniform() < 0.15 else _rlcr(a, q))
    gold.append([[n] for n in rng.choice(names, 2, replace=False)])
  cfg = _cfg(preset=preset, confidence_sum_le_one=True, format_penalty=-1.0,
             weights=(0.3, 0.5, 0.7))  # fmt: skip
  sc = reward.score_texts(texts, gold, cfg)
  comps, w = credit.reward_components(sc, cfg)
  assert comps.shape == (120, 3) and w == (0.3, 0.5, 0.7)
  f = sc.format_ok > 0
  assert 0.7 < f.mean() < 0.95 and (sc.brier_gated[f] > 0).any()
  if preset == "reference":
    np.testing.assert_allclose(comps @ np.array(w), sc.total, atol=1e-6)
  else:
    np.testing.assert_allclose(
      comps[f, 1] + comps[f, 2], sc.total[f], atol=1e-6
    )
    np.testing.assert_array_equal(comps[~f], [[0, 0, -1]] * (~f).sum())
  rlvr = _cfg(mode="multi_rlvr", preset=preset)
  comps2, w2 = credit.reward_components(
    reward.score_texts(texts, gold, rlvr), rlvr
  )
  assert comps2.shape == (120, 2) and w2 == (0.5, 0.5)


def test_rollout_advantages_gdpo_and_config():
  from configs import tiny

  cfg = _cfg(weights=(1.0, 2.0, 0.0))
  # one group of 4: f and acc as test_gdpo_hand_computed
  scores = reward.Scores(
    format_ok=np.array([1, 1, 1, 0], np.float32),
    acc=np.array([1, 0, 0, 0], np.float32),
    brier=np.array([0.1, 0.2, 0.3, np.nan], np.float32),
    brier_gated=np.array([0, 0, 0, 1], np.float32),
  )
  adv, info = credit.rollout_advantages(
    scores, 1, kind="gdpo", credit="sequence", reward_cfg=cfg
  )
  want, _ = advantage.gdpo_advantages(
    jnp.asarray(credit.reward_components(scores, cfg)[0])[None], (1.0, 2.0, 0.0)
  )
  np.testing.assert_allclose(adv, np.asarray(want)[0], rtol=1e-6)
  assert adv[0] > adv[1] == adv[2] > adv[3] and "gdpo/batch_std" in info
  with pytest.raises(ValueError, match="reward_cfg"):
    credit.rollout_advantages(scores, 1, kind="gdpo", credit="sequence")
  c = tiny.get_config()
  c.rl.advantage = "gdpo"
  assert RunConfig.from_dict(c.to_dict()).rl.advantage == "gdpo"
  c.rl.credit = "answer"
  with pytest.raises(ValueError, match="rl.credit='sequence'"):
    RunConfig.from_dict(c.to_dict())
  c.rl.credit, c.rl.advantage = "sequence", "ppo"
  with pytest.raises(ValueError, match="rl.advantage must be one of"):
    RunConfig.from_dict(c.to_dict())


def test_answer_to_go_sums_the_later_slots():
  # P = 1 group of G = 2, A = 3: slot parts per row; to-go sums (r, 3 − i)
  scores = reward.Scores(
    total=np.array([1.5, 0.5], np.float32),
    slot=np.array([[1.0, 0.0, 0.5], [0.0, 0.5, 0.0]], np.float32),
    decomposable=np.array([1.0, 0.0], np.float32),
  )
  slots = np.array([[-1, 0, 1, 2], [0, 1, 2, -2]], np.int32)
  adv, _ = credit.rollout_advantages(
    scores, 1, kind="drgrpo", credit="answer_to_go", token_slot=slots
  )
  # to-go: row 0 (1.5, 0.5, 0.5), row 1 (0.5, 0.5, 0.0); slot means
  # (1.0, 0.5, 0.25) → row 0 (0.5, 0, 0.25). Row 1 does not decompose:
  # every token keeps the sequence advantage −0.5.
  np.testing.assert_allclose(adv[0], [0.5, 0.5, 0.0, 0.25])
  np.testing.assert_allclose(adv[1], [-0.5, -0.5, -0.5, -0.5])
  own, _ = credit.rollout_advantages(
    scores, 1, kind="drgrpo", credit="answer", token_slot=slots
  )
  np.testing.assert_allclose(own[0], [0.5, 0.5, -0.25, 0.25])
  # slot 1's to-go is the whole set's slot sum: its advantage is the
  # sequence one whenever every row decomposes
  scores.decomposable[:] = 1
  adv, _ = credit.rollout_advantages(
    scores, 1, kind="drgrpo", credit="answer_to_go", token_slot=slots
  )
  seq, _ = credit.rollout_advantages(
    scores, 1, kind="drgrpo", credit="sequence"
  )
  assert adv[0, 1] == pytest.approx(seq[0]) and adv[1, 0] == pytest.approx(
    seq[1]
  )
  with pytest.raises(ValueError, match="credit_baseline='slot'"):
    credit.rollout_advantages(
      scores, 1, kind="drgrpo", credit="answer_to_go", baseline="pooled"
    )


# ------------------------------------ decoupled credit: per-answer baseline


def test_answer_baseline_by_hand():
  # P = 1, G = 3, A = 2; keys: answer 0 in rows 0 and 2, answer 1 in rows
  # 0 and 1, answer 2 only in row 1, row 2 slot 1 empty (-1).
  cal = jnp.array([[[-0.1, -0.2], [-0.3, -0.05], [-0.4, -0.6]]])
  keys = jnp.array([[[0, 1], [1, 2], [0, -1]]])
  ok = jnp.ones((1, 3), bool)
  fallback = jnp.full((1, 3, 2), 9.0)
  adv, found = credit.answer_baselined(cal, keys, ok, fallback)
  want = [[-0.1 + 0.4, -0.2 + 0.3], [-0.3 + 0.2, 9.0], [-0.4 + 0.1, 9.0]]
  np.testing.assert_allclose(adv[0], want, atol=1e-6)
  assert found == pytest.approx(4 / 5)  # 5 stated answers, 4 baselined
  # A completion that does not decompose lends no baseline: row 2 out,
  # answer 0 of row 0 has no other statement left.
  part, found = credit.answer_baselined(
    cal, keys, jnp.array([[True, True, False]]), fallback
  )
  assert part[0, 0, 0] == 9.0 and found == pytest.approx(2 / 4)
  # Leave-one-out: a row's own share moves its advantage one for one and
  # never its baseline.
  bumped = cal.at[0, 0, 0].add(-0.5)
  adv2, _ = credit.answer_baselined(bumped, keys, ok, fallback)
  assert float(adv2[0, 0, 0]) == pytest.approx(float(adv[0, 0, 0]) - 0.5)


def test_answer_baseline_in_decoupled_credit():
  scores = jax.tree.map(np.asarray, _decoupled_scores())
  # Rows 0 and 1 state answer 7 in slots 0 / 1 (calibration shares
  # −0.125 / −0.125 → advantage 0 each); other answers are their own.
  scores = scores.replace(
    answer_key=np.array([[7, 1], [2, 7], [-1, -1]], np.int32)
  )
  slots = np.array([[-1, 0, 2, 1, 3, -2]] * 3, np.int32)
  kw = dict(kind="drgrpo", credit="decoupled", token_slot=slots)
  slot_b, _ = credit.rollout_advantages(scores, 1, **kw)
  ans_b, info = credit.rollout_advantages(scores, 1, baseline="answer", **kw)
  # Answer spans (columns 1, 3) keep the slot baseline.
  np.testing.assert_allclose(ans_b[:, [0, 1, 3, 5]], slot_b[:, [0, 1, 3, 5]])
  # Row 0 conf 0 (answer 7, row 1's share −0.125): 0; row 1 conf 1 the
  # same; row 0 conf 1 and row 1 conf 0 have no partner: slot baseline.
  np.testing.assert_allclose(ans_b[0, [2, 4]], [0.0, slot_b[0, 4]], atol=1e-7)
  np.testing.assert_allclose(ans_b[1, [2, 4]], [slot_b[1, 2], 0.0], atol=1e-7)
  assert info["credit/answer_baseline_frac"] == pytest.approx(2 / 4)
  # rl.conf_adv_scale: the confidence columns (2, 4) of the rows that
  # decompose alone, times λ; row 2 keeps its sequence advantage.
  scaled, _ = credit.rollout_advantages(scores, 1, conf_scale=3.0, **kw)
  scaled = np.array(scaled)
  np.testing.assert_allclose(scaled[:2, [2, 4]], 3 * slot_b[:2, [2, 4]])
  scaled[:2, [2, 4]] = slot_b[:2, [2, 4]]
  np.testing.assert_allclose(scaled, slot_b)
  with pytest.raises(ValueError, match="answer_key"):
    credit.rollout_advantages(
      scores.replace(answer_key=None), 1, baseline="answer", **kw
    )


@pytest.mark.parametrize(
  "credit_kind, advantage_kind",
  [("answer", "drgrpo"), ("decoupled", "grpo")],
)
def test_config_rejects_answer_baseline_outside_decoupled(
  credit_kind, advantage_kind
):
  from configs import lab

  c = lab.get_config("multi_rlcr")
  c.rl.credit_baseline, c.rl.conf_adv_scale = "answer", 1.0
  assert RunConfig.from_dict(c.to_dict()).rl.credit_baseline == "answer"
  c.rl.credit, c.rl.advantage = credit_kind, advantage_kind
  with pytest.raises(ValueError, match="credit_baseline='answer'"):
    RunConfig.from_dict(c.to_dict())


# ------------------------------------ the confidences' own entropy bonus


def test_confidence_entropy_bonus_by_hand():
  adv = np.array([[0.5, 0.5, 0.5, 0.5], [-1.0, -1.0, -1.0, 0.0]], np.float32)
  # A = 2: spans 0, 1 answers, 2, 3 confidences; -1 shared, -2 padding.
  slots = np.array([[-1, 0, 2, 3], [1, 2, -1, -2]], np.int32)
  logp = np.log(np.array([[0.9, 0.5, 0.25, 0.5], [0.1, 0.5, 0.2, 1.0]]))
  out, info = credit.confidence_entropy_bonus(adv, slots, logp, 2, 0.1)
  b = lambda p: 0.1 * -np.log(p)
  want = [[0.5, 0.5, 0.5 + b(0.25), 0.5 + b(0.5)], [-1, -1 + b(0.5), -1, 0]]
  np.testing.assert_allclose(out, want, rtol=1e-6)
  neg = -np.log([0.25, 0.5, 0.5])
  assert info["credit/conf_neg_logp"] == pytest.approx(neg.mean(), rel=1e-6)
  assert info["credit/conf_entropy_coef"] == pytest.approx(0.1)
  with pytest.raises(ValueError, match="per-token advantages"):
    credit.confidence_entropy_bonus(adv[:, 0], slots, logp, 2, 0.1)


def test_confidence_entropy_bonus_is_the_entropy_gradient():
  # E_y[−log π(y) ∇ log π(y)] = ∇ H(π): the bonus's policy gradient in
  # expectation (exact sum over y) is the entropy's gradient.
  theta = jnp.array([0.3, -1.2, 2.0, 0.1, -0.4])
  logp = jax.nn.log_softmax(theta)
  score = jax.jacobian(jax.nn.log_softmax)(theta)  # [y, θ]
  expected = jnp.sum(jnp.exp(logp)[:, None] * -logp[:, None] * score, 0)
  entropy = lambda t: -jnp.sum(jax.nn.softmax(t) * jax.nn.log_softmax(t))
  np.testing.assert_allclose(expected, jax.grad(entropy)(theta), atol=1e-6)


def test_confidence_entropy_schedule_and_config():
  from configs import lab
  from multians_jax.rl import loss

  decay = lambda step: float(loss.linear_decay(0.05, 4000, step))
  assert [decay(0), decay(2000), decay(4000), decay(5000)] == pytest.approx(
    [0.05, 0.025, 0.0, 0.0]
  )
  assert float(loss.linear_decay(0.05, 0, 10**6)) == pytest.approx(0.05)
  c = lab.get_config("multi_rlcr")
  c.rl.conf_entropy_coef = 0.05
  assert RunConfig.from_dict(c.to_dict()).rl.conf_entropy_coef == 0.05
  for key, value, match in [
    ("credit", "sequence", "per-token advantages"),
    ("conf_entropy_coef", -0.1, "must be >= 0"),
    ("conf_adv_scale", 0.0, "conf_adv_scale must be > 0"),
  ]:
    bad = lab.get_config("multi_rlcr")
    bad.rl.conf_entropy_coef, bad.rl.conf_adv_scale = 0.05, 1.0
    bad.rl[key] = value
    with pytest.raises(ValueError, match=match):
      RunConfig.from_dict(bad.to_dict())
  c.reward.mode = "multi_rlvr"
  with pytest.raises(ValueError, match="has none"):
    RunConfig.from_dict(c.to_dict())


def test_run_advantages_apply_the_bonus_at_the_step():
  """``rollouts.advantages`` (what the loop calls with the state's step):
  the confidence tokens' bonus follows the schedule, the rest is the
  decoupled credit's."""
  from configs import lab
  from multians_jax.rl import rollouts

  scores = jax.tree.map(np.asarray, _decoupled_scores())
  slots = np.array([[-1, 0, 2, 1, 3, -2]] * 3, np.int32)
  logp = np.full((3, 6), np.log(0.5), np.float32)
  ro = sampler.Rollout(
    prompt_tokens=jnp.ones((1, 2), jnp.int32),
    prompt_mask=jnp.ones((1, 2), bool),
    tokens=jnp.ones((3, 6), jnp.int32),
    logprobs=jnp.asarray(logp),
    mask=jnp.asarray(slots != credit.PAD),
    lengths=jnp.array([5, 5, 5], jnp.int32),
    truncated=jnp.zeros(3, bool),
  )
  lengths, cut = np.full(3, 5), np.zeros(3, bool)
  rw = rollouts.Rewards(scores, lengths, cut, slots)
  scored = rollouts.Scored(ro, rw)
  c = lab.get_config("multi_rlcr")
  c.reward.num_answers, c.rl.conf_adv_scale = 2, 1.0
  c.rl.conf_entropy_coef, c.rl.conf_entropy_decay_steps = 0.1, 10
  run = RunConfig.from_dict(c.to_dict())
  base, _ = credit.rollout_advantages(
    scores, 1, kind="drgrpo", credit="decoupled", token_slot=slots
  )
  for step, beta in [(0, 0.1), (5, 0.05), (10, 0.0)]:
    adv, info = rollouts.advantages(run, scored, 1, step=step)
    assert info["credit/conf_entropy_coef"] == pytest.approx(beta)
    bonus = np.where(slots >= 2, beta * np.log(2.0), 0.0)
    np.testing.assert_allclose(adv, base + bonus, atol=1e-6)
