"""Per-answer credit (``rl.credit='answer'``, METHOD §10, docs/CREDIT.md).

With K answers in one generation, sequence credit gives every token the
advantage of the whole set. Under answer credit the tokens of answer span i
and confidence span i take an advantage from slot i's own reward part
(``reward``'s ``slot``), baselined within the group
(``advantage.slot_advantages``); shared tokens (think, analysis, the tags
and the whitespace between blocks) and every token of a completion whose
reward does not decompose (format or distinctness failure, a tripped gate)
keep the sequence advantage.

``answer_to_go`` gives the tokens of slot i the parts of slots i..K
instead of slot i's alone (reward-to-go over slots). Slot i's answer and
confidence are in the context of every later slot, and a later slot's
correctness part depends on them (an answer already given earns nothing
again), so ``answer`` drops those terms of the set's gradient; the parts
of earlier slots are fixed before slot i is written, so leaving them out
keeps the estimator unbiased.

``decoupled`` splits each slot's part into its correctness and calibration
shares: answer span i takes the correctness shares of slots i..K (to go),
confidence span i its own calibration share, each baselined in its group,
so an answer is not pushed by its confidence's Brier noise nor a
confidence by its answer's luck (docs/CREDIT.md says what this is a
gradient of).

Host side: ``token_slots`` finds which completion tokens fall inside which
answer / confidence span of the decoded text. Device side:
``token_advantages`` assembles the [B, L] advantages the loss reads.
"""

from __future__ import annotations

import bisect

import jax
import jax.numpy as jnp
import numpy as np

from multians_jax import settings
from multians_jax.data import prompts
from multians_jax.rl import advantage, parsing, reward

# This module's settings (defined in the leaf settings.py).
CREDITS = settings.CREDITS

SHARED, PAD = -1, -2  # token_slots values that are not a slot index


def _content_spans(text: str, tag: str) -> tuple[int, int] | None:
  """Character span of the content of the first ``<tag>...</tag>``."""
  start = None
  for closing, name, s, e in parsing._tags(text):  # noqa: SLF001
    if name != tag:
      continue
    if not closing and start is None:
      start = e
    elif closing and start is not None:
      return (start, s) if s > start else None
  return None


class _PrefixLengths:
  """len(decode(tokens[:n])), decoded lazily and cached (a few per span)."""

  def __init__(self, tokenizer, ids: list[int]):
    self.tok, self.ids, self.cache = tokenizer, ids, {0: 0}

  def __getitem__(self, n: int) -> int:
    if n not in self.cache:
      self.cache[n] = len(
        self.tok.decode(self.ids[:n], skip_special_tokens=True)
      )
    return self.cache[n]

  def __len__(self) -> int:
    return len(self.ids) + 1


def _token_of_char(prefix: _PrefixLengths, c: int) -> int:
  """Index of the token whose decoded text holds character c: the first n
  with len(decode(tokens[:n+1])) > c (binary search; prefix lengths grow
  with n)."""
  return bisect.bisect_right(prefix, c, lo=0, hi=len(prefix)) - 1


def row_slots(
  tokenizer, ids, text: str, cfg: reward.RewardConfig
) -> np.ndarray:
  """int32 [len(ids)]: each token's span: i (0..A-1) in answer i, A + i
  in confidence i, -1 shared.

  Span tokens are those whose decoded characters overlap the content of
  ``<answer_i>`` or ``<confidence_i>`` (a token that merges a tag with
  content counts as content).
  """
  ids = list(ids)
  out = np.full(len(ids), SHARED, np.int32)
  if not ids:
    return out
  prefix = _PrefixLengths(tokenizer, ids)
  tags = zip(
    prompts.answer_tags(cfg.mode, cfg.num_answers),
    prompts.confidence_tags(cfg.mode, cfg.num_answers)
    or (None,) * cfg.num_answers,
    strict=True,
  )
  for i, names in enumerate(tags):
    for value, name in zip((i, cfg.num_answers + i), names, strict=True):
      span = _content_spans(text, name) if name else None
      if span is None:
        continue
      first = _token_of_char(prefix, span[0])
      last = _token_of_char(prefix, span[1] - 1)
      out[max(first, 0) : min(last, len(ids) - 1) + 1] = value
  return out


def token_slots(tokenizer, rollout, texts, format_ok, cfg) -> np.ndarray:
  """int32 [B, L] span of every completion token (``row_slots``: answer
  i → i, confidence i → A + i): ``SHARED`` (-1) outside the spans and on
  every token of a row that is not format-valid, ``PAD`` (-2) past the
  completion's length.

  Args:
    tokenizer: the tokenizer that decoded ``texts``.
    rollout: ``sampler.Rollout`` rows (``tokens`` [B, L], ``lengths`` [B]).
    texts: B decoded completions (``rollouts.decode``).
    format_ok: [B] format flags from scoring.
    cfg: ``reward.RewardConfig``.
  """
  toks, lengths = np.asarray(rollout.tokens), np.asarray(rollout.lengths)
  out = np.full(toks.shape, PAD, np.int32)
  for b, (t, n) in enumerate(zip(toks, lengths, strict=True)):
    out[b, :n] = SHARED
    if format_ok[b]:
      out[b, :n] = row_slots(tokenizer, t[:n].tolist(), texts[b], cfg)
  return out


@jax.jit
def token_advantages(seq_adv, slot_adv, slots, valid) -> jax.Array:
  """float32 [B, L]: each span's advantage on its tokens, the sequence
  advantage elsewhere.

  Args:
    seq_adv: float [B] sequence advantages.
    slot_adv: float [B, 2A] per-span advantages: answer spans' (columns
      0..A-1), then confidence spans' (A..2A-1).
    slots: int [B, L] from ``token_slots``.
    valid: bool [B] decomposable completions.
  """
  idx = jnp.clip(slots, 0, slot_adv.shape[1] - 1)
  per_slot = jnp.take_along_axis(slot_adv, idx, axis=1)
  use = (slots >= 0) & valid.astype(bool)[:, None]
  return jnp.where(use, per_slot, seq_adv[:, None]).astype(jnp.float32)


def reward_components(scores: reward.Scores, cfg: reward.RewardConfig):
  """The reward components ``rl.advantage='gdpo'`` normalises separately.

  Format f (0/1), the gated correctness r_acc, and in the confidence modes
  the calibration term: −B, or −1 where the Brier term is gated, under the
  ``paper`` preset; 1 − B, or 0, under ``reference``. Their weights are
  ``reward.weights`` (w_f, w_a, w_b) under both presets (GDPO sums the
  normalised components with weights; the paper preset's format penalty
  is replaced by the normalised format component).

  Returns:
    ``(components float32 [B, C], weights (C,))``, C = 3 or 2.
  """
  f = np.asarray(scores.format_ok, np.float32)
  acc = np.asarray(scores.acc, np.float32)
  cols, w = [f, acc], list(cfg.weights[:2])
  if prompts.has_confidence(cfg.mode):
    brier = np.nan_to_num(np.asarray(scores.brier, np.float32))
    gated = np.asarray(scores.brier_gated) > 0
    if cfg.preset == "paper":
      cal = np.where(gated, -1.0, -brier)
    else:
      cal = np.where(gated, 0.0, 1.0 - brier)
    cols.append(cal.astype(np.float32))
    w.append(cfg.weights[2])
  return np.stack(cols, axis=1), tuple(float(x) for x in w)


def rollout_advantages(scores: reward.Scores, p: int, *, kind: str, credit: str,
                       baseline: str = "slot", token_slot=None,
                       reward_cfg: reward.RewardConfig | None = None,
                       pass_k: int = 0, conf_scale: float = 1.0
                       ) -> tuple[np.ndarray, dict]:  # fmt: skip
  """The advantages the update step reads, from a batch's gathered scores.

  Args:
    scores: every row's ``reward.Scores`` (prompt-major).
    p: prompts in the batch (groups of B / p rows).
    kind: ``rl.advantage``.
    credit: ``sequence`` ([B] advantages), ``answer`` or ``answer_to_go``
      ([B, L]).
    baseline: ``rl.credit_baseline`` (``advantage.slot_advantages``).
    token_slot: int32 [B, L] (``token_slots``); needed by answer credit.
    reward_cfg: the reward settings; needed by ``kind='gdpo'``
      (``reward_components``).
    pass_k: k of ``kind='passk'`` (``advantage.passk_advantages``).
    conf_scale: ``rl.conf_adv_scale``, the factor on the confidence spans'
      advantages under decoupled credit.

  Returns:
    ``(adv, info)``: host float32 advantages and scalar metrics (the
    advantage info, and under answer credit ``credit/decomposable_frac``
    and ``credit/slot_token_frac``, the share of completion tokens that
    took a slot's advantage).
  """
  settings.check_credit(kind, credit, baseline)
  if kind == "gdpo":
    if reward_cfg is None:
      raise ValueError("rl.advantage='gdpo' needs reward_cfg")
    comps, w = reward_components(scores, reward_cfg)
    comps = jnp.asarray(comps).reshape(p, -1, comps.shape[1])
    adv, info = advantage.gdpo_advantages(comps, w)
    return np.asarray(adv.reshape(-1)), {k: float(v) for k, v in info.items()}
  total = jnp.asarray(scores.total, jnp.float32).reshape(p, -1)
  if kind == "passk":
    seq, info = advantage.passk_advantages(total, pass_k)
  else:
    seq, info = advantage.advantages(total, kind)
  seq = seq.reshape(-1)
  info = {k: float(v) for k, v in info.items()}
  if credit == "sequence":
    return np.asarray(seq), info
  if credit == "decoupled":
    return _decoupled(
      scores, p, kind, baseline, token_slot, seq, info, conf_scale
    )
  slot = jnp.asarray(scores.slot, jnp.float32)
  if credit == "answer_to_go":  # Σ_{j ≥ i} of the slot parts
    slot = jnp.flip(jnp.cumsum(jnp.flip(slot, 1), axis=1), 1)
  valid = jnp.asarray(scores.decomposable) > 0
  g, a = slot.shape[0] // p, slot.shape[1]
  slot_adv = advantage.slot_advantages(
    slot.reshape(p, g, a), kind, baseline=baseline
  ).reshape(-1, a)
  both = jnp.concatenate([slot_adv, slot_adv], axis=1)  # answer and conf.
  return _per_token(seq, both, valid, token_slot, credit, info)


def _per_token(seq, span_adv, valid, token_slot, credit, info):
  """``token_advantages`` and the credit metrics."""
  if token_slot is None:
    raise ValueError(f"rl.credit={credit!r} needs token_slot")
  slots = jnp.asarray(token_slot)
  adv = token_advantages(seq, span_adv, slots, valid)
  real = np.asarray(slots) != PAD
  used = (np.asarray(slots) >= 0) & np.asarray(valid)[:, None]
  info["credit/decomposable_frac"] = float(np.mean(np.asarray(valid)))
  info["credit/slot_token_frac"] = float(used.sum() / max(real.sum(), 1))
  return np.asarray(adv), info


def _decoupled(scores, p: int, kind: str, baseline: str, token_slot, seq,
               info, conf_scale: float = 1.0):  # fmt: skip
  """``rl.credit='decoupled'``: answer span i takes the group-relative
  advantage of the correctness shares of slots i..K, confidence span i
  that of its own calibration share (docs/CREDIT.md). A row that does not
  decompose enters the calibration baselines at its group's mean over the
  rows that do (it has no calibration share of its own), so it shifts
  nothing; its tokens keep the sequence advantage ``seq``. The confidence
  spans' advantages are multiplied by ``conf_scale``."""
  slot = jnp.asarray(scores.slot, jnp.float32)
  cal = jnp.asarray(scores.slot_cal, jnp.float32)
  valid = jnp.asarray(scores.decomposable) > 0
  g, a = slot.shape[0] // p, slot.shape[1]
  acc = jnp.flip(jnp.cumsum(jnp.flip(slot - cal, 1), axis=1), 1)  # to go
  ok = valid.reshape(p, g, 1)
  cal = cal.reshape(p, g, a)
  n = jnp.maximum(jnp.sum(ok, axis=1, keepdims=True), 1)
  mean = jnp.sum(jnp.where(ok, cal, 0.0), axis=1, keepdims=True) / n
  cal = jnp.where(ok, cal, mean)
  per_slot = "slot" if baseline == "answer" else baseline
  adv = lambda x: advantage.slot_advantages(x, kind, baseline=per_slot)
  cal_adv = adv(cal)
  if baseline == "answer":
    if scores.answer_key is None:
      raise ValueError("rl.credit_baseline='answer' needs scores.answer_key")
    keys = jnp.asarray(scores.answer_key).reshape(p, g, a)
    cal_adv, found = answer_baselined(cal, keys, ok[..., 0], cal_adv)
    info["credit/answer_baseline_frac"] = found
  cal_adv = cal_adv * conf_scale
  span = jnp.concatenate([adv(acc.reshape(p, g, a)), cal_adv], axis=2)
  span = span.reshape(-1, 2 * a)
  return _per_token(seq, span, valid, token_slot, "decoupled", info)


def answer_baselined(cal, keys, ok, fallback) -> tuple[jax.Array, float]:
  """``rl.credit_baseline='answer'``: each calibration share minus the
  mean share of the *same answer* in the group's other completions.

  A confidence's share is −(q − c)²/K; c is the same for every completion
  of a group that states that answer (one gold draw per record), so a
  baseline over those completions removes the outcome's noise, which a
  baseline over the slot (answers with other outcomes) keeps. The other
  completions are sampled independently of this confidence, so the
  baseline leaves the gradient unbiased. A share with no other completion
  of its answer in the group keeps ``fallback`` (the slot baseline's).

  Args:
    cal: float [P, G, A] calibration shares.
    keys: int [P, G, A] answer ids (``reward.Scores.answer_key``; -1: none).
    ok: bool [P, G] completions whose reward decomposes.
    fallback: float [P, G, A] advantages where no baseline is found.

  Returns:
    ``(adv, found)``: float32 [P, G, A], and the share of stated answers
    (of decomposing completions) that found a baseline.
  """
  g = cal.shape[1]
  other = ~jnp.eye(g, dtype=bool)[None, :, None, :, None]  # g' != g
  same = keys[:, :, :, None, None] == keys[:, None, None, :, :]
  use = same & other & (keys >= 0)[:, None, None] & ok[:, None, None, :, None]
  n = jnp.sum(use, axis=(3, 4))
  total = jnp.sum(jnp.where(use, cal[:, None, None], 0.0), axis=(3, 4))
  adv = jnp.where(n > 0, cal - total / jnp.maximum(n, 1), fallback)
  stated = (keys >= 0) & ok[..., None]
  found = jnp.sum(stated & (n > 0)) / jnp.maximum(jnp.sum(stated), 1)
  return adv.astype(jnp.float32), float(found)


def confidence_entropy_bonus(
  adv, token_slot, logprobs, num_answers: int, beta: float
) -> tuple[np.ndarray, dict]:
  """Per-token advantages with an entropy bonus on the confidence spans
  alone (``rl.conf_entropy_coef``, docs/CREDIT.md).

  Every token y_t of a confidence span gains β·(−log π_old(y_t|s_t)).
  Since E_y[−log π(y) ∇ log π(y)] = ∇ H(π(·|s_t)), the policy gradient of
  the added term is an unbiased sampled estimate of β ∇H on those tokens
  (what ``loss.entropy_coef`` adds on every token, kept here on the
  confidences only): exploration that can outlive the answers'.

  Args:
    adv: float [B, L] per-token advantages (``rollout_advantages`` under
      answer or decoupled credit).
    token_slot: int [B, L] (``token_slots``): confidence span i is
      ``num_answers + i``.
    logprobs: float [B, L] the sampler's log-probs of the tokens.
    num_answers: ``reward.num_answers``.
    beta: β now (``loss.linear_decay`` of the schedule).

  Returns:
    ``(adv, info)``: the advantages and ``credit/conf_neg_logp`` (mean
    −log π_old over confidence tokens: a sampled estimate of their
    entropy, nats) and ``credit/conf_entropy_coef`` (β).
  """
  adv = np.asarray(adv, np.float32)
  if adv.ndim != 2:
    raise ValueError(
      "rl.conf_entropy_coef needs per-token advantages (rl.credit "
      f"'answer', 'answer_to_go' or 'decoupled'); got shape {adv.shape}"
    )
  conf = np.asarray(token_slot) >= num_answers
  neg = np.where(conf, -np.asarray(logprobs, np.float32), 0.0)
  info = {
    "credit/conf_neg_logp": float(neg.sum() / max(conf.sum(), 1)),
    "credit/conf_entropy_coef": float(beta),
  }
  return (adv + np.float32(beta) * neg).astype(np.float32), info
