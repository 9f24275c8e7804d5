"""Evaluation and telemetry metrics of METHOD §6 as pure numpy functions.

Shape letters: P prompts, G generations per prompt, A answer slots per
generation (the paper's K; 1 for single-answer models), N (q, c) pairs.
A budget of k answers pools the first k / A generations of each prompt.

Inputs follow ``reward.score_texts``: ``entry_id`` (matched gold entry,
-1 none), ``answer_key`` (batch-global id of the normalised answer, -1
missing), ``correct``, ``confidence`` (missing read as 0) and ``format_ok``.
"""

from __future__ import annotations

import math

import numpy as np


def _pool(x: np.ndarray, k: int) -> np.ndarray:
  """[P, G, A] → [P, n·A] with the first n = k / A generations."""
  x = np.asarray(x)
  a = x.shape[-1]
  if k % a or not 0 < k // a <= x.shape[1]:
    raise ValueError(
      f"k={k} must be a multiple of A={a} with k/A <= G={x.shape[1]}"
    )
  return x[:, : k // a].reshape(x.shape[0], -1)


def _distinct_nonneg(rows: np.ndarray) -> np.ndarray:
  """Number of distinct values >= 0 per row of a 2-D int array."""
  return np.array([len({v for v in r.tolist() if v >= 0}) for r in rows])


def coverage_at_k(entry_id, k: int) -> np.ndarray:
  """Distinct gold entries hit among k pooled answers. [P, G, A] → [P]."""
  return _distinct_nonneg(_pool(entry_id, k))


def recall_at_k(entry_id, k: int, num_gold) -> np.ndarray:
  """Fraction of each prompt's gold entries hit among k answers. → [P]."""
  return coverage_at_k(entry_id, k) / np.maximum(np.asarray(num_gold), 1)


def pass_at_k(entry_id, k: int) -> np.ndarray:
  """1 if any of the k pooled answers is correct. [P, G, A] → [P]."""
  return (_pool(entry_id, k) >= 0).any(-1).astype(np.float64)


def pass_at_k_unbiased(n, c, k: int) -> np.ndarray:
  """1 - C(n-c, k) / C(n, k): n samples, c correct (HumanEval estimator)."""
  n, c = np.broadcast_arrays(np.asarray(n), np.asarray(c))
  out = np.empty(n.shape, np.float64)
  for idx in np.ndindex(n.shape):
    ni, ci = int(n[idx]), int(c[idx])
    if k > ni:
      raise ValueError(f"k={k} exceeds the number of samples n={ni}")
    if ni - ci < k:
      out[idx] = 1.0
    else:
      out[idx] = 1.0 - np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1))
  return out


def top1_accuracy(correct, confidence=None) -> np.ndarray:
  """Correctness of the answer with the highest stated confidence (first on
  ties), or of the first answer when ``confidence`` is None. [..., A] →
  [...]."""
  correct = np.asarray(correct)
  if confidence is None:
    return correct[..., 0].astype(np.float64)
  pick = np.argmax(np.nan_to_num(np.asarray(confidence), nan=-1.0), axis=-1)
  return np.take_along_axis(correct, pick[..., None], -1)[..., 0] * 1.0


def unique_answers(answer_key, k: int) -> np.ndarray:
  """Unique normalised answers among k pooled answers. [P, G, A] → [P]."""
  return _distinct_nonneg(_pool(answer_key, k))


def duplicate_rate(answer_key) -> np.ndarray:
  """Fraction of a generation's answers that repeat an earlier one in the
  same generation (missing answers ignored). [..., A] → [...]."""
  keys = np.asarray(answer_key)
  flat = keys.reshape(-1, keys.shape[-1])
  dup = [
    sum(1 for i, v in enumerate(r) if v >= 0 and v in r[:i]) / len(r)
    for r in flat.tolist()
  ]
  return np.array(dup).reshape(keys.shape[:-1])


def set_brier(confidence, correct) -> np.ndarray:
  """Σ_i (q_i - c_i)² per generation (sum over A). [..., A] → [...]."""
  q = np.nan_to_num(np.asarray(confidence, np.float64))
  return ((q - np.asarray(correct)) ** 2).sum(-1)


def per_answer_brier(confidence, correct) -> float:
  """Mean (q - c)² over all answers."""
  q = np.nan_to_num(np.asarray(confidence, np.float64))
  return float(((q - np.asarray(correct)) ** 2).mean())


def ece(confidence, correct, bins: int = 10) -> float:
  """Expected calibration error, ``bins`` equal-width bins on [0, 1]."""
  rb = {
    k: np.asarray(v)
    for k, v in reliability_bins(confidence, correct, bins).items()
  }
  n = rb["count"]
  if n.sum() == 0:
    return math.nan
  m = n > 0
  gap = np.abs(rb["sum_correct"][m] - rb["sum_conf"][m]) / n[m]
  return float((n[m] / n.sum() * gap).sum())


def auroc(confidence, correct) -> float:
  """Area under the ROC of q as a score for c (ties count one half); NaN
  when only one class is present."""
  q = np.nan_to_num(np.asarray(confidence, np.float64)).ravel()
  c = np.asarray(correct).ravel().astype(bool)
  n_pos, n_neg = int(c.sum()), int((~c).sum())
  if n_pos == 0 or n_neg == 0:
    return math.nan
  order = np.argsort(q, kind="mergesort")
  ranks = np.empty(q.size)
  sorted_q = q[order]
  _, first, counts = np.unique(sorted_q, return_index=True, return_counts=True)
  avg = first + (counts + 1) / 2.0  # 1-based average rank of each tie block
  ranks[order] = np.repeat(avg, counts)
  return float((ranks[c].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mean_conf_sum(confidence) -> float:
  """Mean Σ_i q_i per generation."""
  return float(np.nan_to_num(np.asarray(confidence, np.float64)).sum(-1).mean())


def format_valid_rate(format_ok) -> float:
  """Fraction of generations with a valid format."""
  return float(np.mean(np.asarray(format_ok, np.float64)))


def tokens_per_distinct_correct(lengths, entry_id) -> float:
  """Completion tokens spent per distinct correct answer, per prompt pooled
  over its generations ([P, G] lengths, [P, G, A] entries); inf if none."""
  lengths, entry_id = np.asarray(lengths), np.asarray(entry_id)
  hits = coverage_at_k(entry_id, entry_id.shape[1] * entry_id.shape[2]).sum()
  return float(lengths.sum() / hits) if hits else math.inf


def _grouped(x, p: int) -> np.ndarray:
  x = np.asarray(x)
  return x.reshape((p, x.shape[0] // p) + x.shape[1:])


def _pass_at(ids, k: int) -> np.ndarray:
  """pass@k per prompt. Single-answer (A = 1): the unbiased estimator over
  all G samples; multi-answer: any correct among the first k/A pooled
  generations (a generation's K answers are not exchangeable samples)."""
  if ids.shape[-1] == 1:
    correct = (ids[..., 0] >= 0).sum(-1)
    return pass_at_k_unbiased(ids.shape[1], correct, k)
  return pass_at_k(ids, k)


def summarize(
  scores,
  lengths=None,
  group_size: int = 1,
  num_gold=None,
  ks=None,
) -> dict[str, float]:
  """Flat dict of floats from ``reward.score_texts`` outputs.

  Args:
    scores: ``reward.Scores`` ([B] and [B, A] arrays), B = P·G,
      prompt-major.
    lengths: optional [B] completion token counts.
    group_size: G, generations per prompt (for pooled metrics).
    num_gold: optional [P] number of gold entries per prompt (recall).
    ks: answer budgets k (multiples of A); default A·g for g = 1, 2, 4, ...

  Returns:
    Means of every [B] component (``reward/<name>``, with ``_std`` for the
    total) and the METHOD §6 metrics (single-answer pass@k: the unbiased
    estimator over all G samples). Coverage-style metrics count only
    format-valid generations; calibration uses format-valid generations of
    RLCR modes (``brier`` not NaN).
  """
  f = np.asarray(scores.format_ok) > 0
  b, a = np.asarray(scores.entry_id).shape
  if b % group_size:
    raise ValueError(f"batch {b} is not a multiple of group_size {group_size}")
  p = b // group_size
  out = {
    f"reward/{k}": float(np.nanmean(v))
    for k, v in scores.per_row().items()
    if not np.all(np.isnan(v))
  }
  out["reward/total_std"] = float(np.std(scores.total))
  ids = _grouped(np.where(f[:, None], scores.entry_id, -1), p)
  keys = _grouped(np.where(f[:, None], scores.answer_key, -1), p)
  ks = ks or [a * g for g in _powers(group_size)]
  for k in ks:
    out[f"coverage@{k}"] = float(coverage_at_k(ids, k).mean())
    out[f"pass@{k}"] = float(_pass_at(ids, k).mean())
    out[f"unique@{k}"] = float(unique_answers(keys, k).mean())
    if num_gold is not None:
      out[f"recall@{k}"] = float(recall_at_k(ids, k, num_gold).mean())
  out["format_valid_rate"] = format_valid_rate(f)
  if f.any():  # over format-valid generations only
    out["duplicate_rate"] = float(duplicate_rate(scores.answer_key)[f].mean())
  calibrated = not np.all(np.isnan(scores.brier))
  conf = np.asarray(scores.confidence)
  correct = np.asarray(scores.correct) * f[:, None]
  top1 = top1_accuracy(correct, conf if calibrated else None)
  out["top1_accuracy"] = float(top1.mean())
  if calibrated and f.any():
    q, c = conf[f], correct[f]
    out["set_brier"] = float(set_brier(q, c).mean())
    out["per_answer_brier"] = per_answer_brier(q, c)
    out["ece"] = ece(q, c)
    out["auroc"] = auroc(q, c)
    out["mean_conf_sum"] = mean_conf_sum(q)
  if lengths is not None:
    lengths = np.asarray(lengths)
    out["completion_tokens"] = float(lengths.mean())
    out["tokens_per_distinct_correct"] = tokens_per_distinct_correct(
      _grouped(lengths, p), ids
    )
  return out


# ------------------------------------------------ known answer distribution


def expected_coverage_at_k(answer_p, answer_key, k: int) -> np.ndarray:
  """P(gold ∈ the k pooled answers) when the gold is one draw from a known
  p: the sum of p over the pool's distinct answers. [P, G, A] → [P].

  ``answer_p``: p(a_i|q) of each answer (0 for an implausible, missing or
  format-invalid one); ``answer_key``: normalised-answer ids (-1 missing).
  """
  ps, keys = _pool(answer_p, k), _pool(answer_key, k)
  out = np.zeros(ps.shape[0])
  for i, (pr, kr) in enumerate(zip(ps.tolist(), keys.tolist(), strict=True)):
    first = {}
    for v, key in zip(pr, kr, strict=True):
      if key >= 0:
        first.setdefault(key, v)
    out[i] = sum(first.values())
  return out


def slot_summary(scores, group_size: int, answer_p=None) -> dict[str, float]:
  """Per answer slot i (keys ``slot{i+1}/...``), what a training step's
  completions put there: ``answer_entropy``, the entropy (nats) of the
  slot's answers within a group (format-valid rows; the mean over groups
  with one): how far the slot has collapsed; ``part`` and ``cal``, its mean
  reward part and calibration share on rows that decompose; with a known
  distribution (``answer_p`` [B, A]), ``distractor_frac``, the share of its
  answers with p = 0, and ``distractor_q``, their mean stated confidence.
  """
  keys = np.asarray(scores.answer_key)
  b, a = keys.shape
  ok = np.asarray(scores.format_ok) > 0
  dec = (
    np.asarray(scores.decomposable) > 0
    if scores.decomposable is not None
    else None
  )
  out = {}
  for i in range(a):
    name = f"slot{i + 1}"
    valid = ok & (keys[:, i] >= 0)
    ents = []
    for grp in range(b // group_size):
      rows = slice(grp * group_size, (grp + 1) * group_size)
      seen = keys[rows, i][valid[rows]]
      if seen.size:
        p = np.unique(seen, return_counts=True)[1] / seen.size
        ents.append(float(-(p * np.log(p)).sum()))
    if ents:
      out[f"{name}/answer_entropy"] = float(np.mean(ents))
    if dec is not None and dec.any() and scores.slot is not None:
      out[f"{name}/part"] = float(np.asarray(scores.slot)[dec, i].mean())
      if scores.slot_cal is not None:
        cal = np.asarray(scores.slot_cal)[dec, i]
        out[f"{name}/cal"] = float(cal.mean())
    if answer_p is not None and valid.any():
      dis = valid & (np.asarray(answer_p)[:, i] == 0)
      out[f"{name}/distractor_frac"] = float(dis.sum() / valid.sum())
      if dis.any() and scores.confidence is not None:
        q = np.nan_to_num(np.asarray(scores.confidence, np.float64))
        out[f"{name}/distractor_q"] = float(q[dis, i].mean())
  return out


def top_mass(probs, k: int) -> np.ndarray:
  """Σ of the k largest probabilities per row: the oracle coverage of k
  distinct answers. [P, S] (0-padded) → [P]."""
  srt = -np.sort(-np.asarray(probs, np.float64), axis=-1)
  return srt[:, :k].sum(-1)


def passk_optimum(probs, k: int, iters: int = 200) -> tuple[float, np.ndarray]:
  """The best pass@k of k independent samples against a known answer
  distribution: max over the simplex of F(π) = Σ_x p(x)·(1 − (1 − π(x))^k).

  F is concave, so the KKT conditions give the optimum: where π(x) > 0,
  k·p(x)·(1 − π(x))^(k−1) = λ, i.e. π(x) = max(0, 1 − (λ / (k·p(x)))^(1 /
  (k−1))) (water-filling: the likelier answers get more mass, but unlike
  K distinct answers a sample may repeat, so mass spreads over more than k
  answers when p is flat). Σ π(λ) falls with λ: λ by bisection. k = 1:
  all mass on the likeliest answer.

  Args:
    probs: [S] p over the answers (0-padding allowed). k: samples (≥ 1).

  Returns:
    (F(π*), π* [S]).
  """
  p = np.asarray(probs, np.float64)
  if k < 1 or p.ndim != 1 or (p < 0).any():
    raise ValueError(f"passk_optimum: k >= 1 and p >= 0 over [S]: {k}, {p}")
  pi = np.zeros_like(p)
  if k == 1 or not p.any():
    pi[np.argmax(p)] = 1.0
    return float(p.max()), pi

  def mass(lam):
    with np.errstate(divide="ignore"):
      ratio = np.where(p > 0, lam / (k * p), np.inf)
    return np.clip(1.0 - ratio ** (1.0 / (k - 1)), 0.0, 1.0)

  lo, hi = 0.0, k * p.max()  # Σ π(0) = |support| ≥ 1, Σ π(hi) = 0
  for _ in range(iters):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if mass(mid).sum() > 1.0 else (lo, mid)
  pi = mass(hi)
  pi /= pi.sum()
  return float(np.sum(p * (1.0 - (1.0 - pi) ** k))), pi


def distribution_summary(
  answer_p,
  answer_key,
  format_ok,
  confidence,
  probs,
  *,
  group_size: int,
  ks,
  calibrated: bool,
  train_p=None,
) -> dict[str, float]:
  """Metrics against a known answer distribution (the ``distlab`` task).

  Args:
    answer_p: [B, A] p(a_i|q) of each answer (0: implausible or missing).
    answer_key: [B, A] normalised-answer ids (-1 missing).
    format_ok: [B] format flags; invalid generations count as no answer.
    confidence: [B, A] stated q_i (missing read as 0).
    probs: [P, S] each prompt's p over its plausible answers, 0-padded.
    group_size: G generations per prompt (B = P·G, prompt-major).
    ks: answer budgets (multiples of A, at most A·G).
    calibrated: the mode states confidences.
    train_p: [B, A] p̂(a_i|q), the answers' gold frequencies in the
      training split (the Brier optimum of a finite training set), or None.

  Returns:
    ``dist/coverage@k`` (expected P(gold ∈ k answers)) and ``dist/oracle@k``
    (its maximum, the top-k mass) for each k; ``dist/coverage`` and
    ``dist/oracle_coverage`` for one generation (k = A); single-answer
    modes (A = 1) also ``dist/passk_optimum@k``, the best pass@k of k
    independent samples (``passk_optimum``); ``dist/top1_p``
    (expected accuracy of the top answer: highest confidence, or first)
    against ``dist/max_p``; with confidences, ``dist/conf_abs_err`` = mean
    |q_i - p(a_i|q)| over the answers of format-valid generations, split
    into ``dist/conf_mean_err`` (|q̄ - p|, q̄ the mean q the prompt's G
    generations state for that answer: confidences that sit wrong) and
    ``dist/conf_spread`` (|q_i - q̄|: confidences that scatter); with
    ``train_p`` also ``dist/conf_train_err`` (mean |q_i - p̂|: the distance
    from what the training objective rewards) and ``dist/conf_train_floor``
    (mean |p̂ - p| over the same answers: the |q - p| of confidences equal
    to p̂, the training sample's error).
  """
  f = np.asarray(format_ok) > 0
  ap = np.where(f[:, None], np.asarray(answer_p, np.float64), 0.0)
  keys = np.where(f[:, None], np.asarray(answer_key), -1)
  b, a = ap.shape
  p = b // group_size
  gp, gk = _grouped(ap, p), _grouped(keys, p)
  probs = np.asarray(probs, np.float64)
  out = {}
  for k in ks:
    cov = expected_coverage_at_k(gp, gk, k)
    out[f"dist/coverage@{k}"] = float(cov.mean())
    out[f"dist/oracle@{k}"] = float(top_mass(probs, k).mean())
    if a == 1:
      best = [passk_optimum(row, k)[0] for row in probs]
      out[f"dist/passk_optimum@{k}"] = float(np.mean(best))
  out["dist/coverage"] = float(expected_coverage_at_k(gp, gk, a).mean())
  out["dist/oracle_coverage"] = float(top_mass(probs, a).mean())
  q = np.nan_to_num(np.asarray(confidence, np.float64))
  pick = np.argmax(q, axis=-1) if calibrated else np.zeros(b, int)
  out["dist/top1_p"] = float(np.take_along_axis(ap, pick[:, None], -1).mean())
  out["dist/max_p"] = float(probs.max(-1).mean())
  if calibrated and f.any():
    has = (np.asarray(answer_key) >= 0) & f[:, None]
    out["dist/conf_abs_err"] = float(np.abs(q - ap)[has].mean())
    mean_q = _mean_per_answer(_grouped(q, p), gk).reshape(b, a)
    out["dist/conf_mean_err"] = float(np.abs(mean_q - ap)[has].mean())
    out["dist/conf_spread"] = float(np.abs(q - mean_q)[has].mean())
    if train_p is not None:
      tp = np.asarray(train_p, np.float64)
      out["dist/conf_train_err"] = float(np.abs(q - tp)[has].mean())
      out["dist/conf_train_floor"] = float(np.abs(tp - ap)[has].mean())
  return out


def _mean_per_answer(q, keys) -> np.ndarray:
  """[P, G, A] → [P, G, A]: each answer's q replaced by the mean q that the
  prompt's generations state for that answer (keys: -1 missing)."""
  out = np.zeros_like(q)
  for i in range(q.shape[0]):
    for key in np.unique(keys[i][keys[i] >= 0]):
      at = keys[i] == key
      out[i][at] = q[i][at].mean()
  return out


def reliability_bins(confidence, correct, bins: int = 10) -> dict:
  """Per equal-width bin: count, Σq and Σc (pools across runs by adding)."""
  q = np.nan_to_num(np.asarray(confidence, np.float64)).ravel()
  c = np.asarray(correct, np.float64).ravel()
  idx = np.minimum((q * bins).astype(int), bins - 1)
  return {
    "count": np.bincount(idx, minlength=bins).tolist(),
    "sum_conf": np.bincount(idx, q, minlength=bins).tolist(),
    "sum_correct": np.bincount(idx, c, minlength=bins).tolist(),
  }


def _powers(g: int) -> list[int]:
  out, n = [], 1
  while n <= g:
    out.append(n)
    n *= 2
  return out
