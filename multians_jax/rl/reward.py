"""The reward: its settings, the set-reward kernel on device, and scoring.

METHOD §2-§4. Host code turns completion strings into arrays (``parsing.parse``
→ the matcher's ``key`` / ``match``, ``matchers.py``);
``set_reward_kernel`` computes every reward component for the whole batch
at once. ``score_texts`` chains both.

Shape letters: B completions, A answer slots (the paper's K; 1 in the
single-answer modes ``rlcr`` / ``rlvr``).

Symbols (METHOD §3): c_i correct, e_i matched entry id (-1 none),
D = |{e_i : e_i >= 0}| distinct correct, f format flag, u distinctness flag,
q_i confidences (missing read as 0), B = (1/A) Σ_i (q_i - c_i)².
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from multians_jax import settings
from multians_jax.data import prompts
from multians_jax.rl import matchers
from multians_jax.rl.parsing import Parsed, parse

# This module's settings (defined in the leaf settings.py).
CORRECTNESS = settings.CORRECTNESS
PAPER = settings.PAPER
PRESETS = settings.PRESETS
RewardConfig = settings.RewardConfig

# Σq > 1 + SUM_TOL trips the ``confidence_sum_le_one`` gate; the tolerance
# absorbs float32 rounding of confidences that sum to exactly one.
SUM_TOL = 1e-5


# ------------------------------------------------------------------ kernel


def _total(preset, f, acc, brier, brier_gated, calibrated, penalty, weights):
  """R of the preset (METHOD §3, "Totals")."""
  if preset == "paper":
    total = acc - jnp.where(brier_gated, 1.0, brier) if calibrated else acc
    return jnp.where(f, total, penalty)
  w_f, w_a, w_b = weights
  total = w_f * f + w_a * acc
  if calibrated:
    total = total + jnp.where(brier_gated, 0.0, w_b * (1.0 - brier))
  return total


@struct.dataclass
class Scores:
  """Every row's reward outputs (METHOD §3), B rows, A answer slots: jax
  arrays out of ``set_reward_kernel``, numpy from ``score_texts``. A pytree:
  ``jax.tree.map`` slices, gathers and concatenates rows of all fields.
  Every field defaults to None (absent: skipped by tree maps), so a test
  or a tool may build the part it needs."""

  total: Any = None  # float32 [B] the reward
  slot: Any = None  # float32 [B, A] each slot's part of total (METHOD §10)
  slot_cal: Any = None  # float32 [B, A] its calibration share (0: none)
  decomposable: Any = None  # float32 [B] 1: total = shared + Σ slot parts
  format_ok: Any = None  # float32 [B] f, the format gate
  distinct: Any = None  # float32 [B] u, answers pairwise distinct
  num_correct: Any = None  # float32 [B] D, distinct gold entries hit
  acc: Any = None  # float32 [B] the (gated) correctness term
  acc_gated: Any = None  # float32 [B] 1 when a gate zeroed the acc term
  brier: Any = None  # float32 [B] the Brier term (NaN in RLVR modes)
  brier_gated: Any = None  # float32 [B] 1 when the Brier term is disabled
  sum_exceeded: Any = None  # float32 [B] Σq > 1
  conf_sum: Any = None  # float32 [B] Σq
  correct: Any = None  # float32 [B, A] c_i, slot i hit a new gold entry
  confidence: Any = None  # float32 [B, A] q_i (0 where missing)
  # host only (score_texts): the matched gold entry per slot (-1 none) and
  # batch-global ids of normalised answers (-1 missing); int32 [B, A]
  entry_id: Any = None
  answer_key: Any = None

  def per_row(self) -> dict:
    """name → value of every [B] field (the means ``metrics`` logs)."""
    return {
      f.name: getattr(self, f.name)
      for f in dataclasses.fields(self)
      if np.ndim(getattr(self, f.name)) == 1
    }


@functools.partial(jax.jit, static_argnames=("mode", "correctness", "preset"))
def set_reward_kernel(
  entry_ids,
  answer_keys,
  confidences,
  format_ok,
  *,
  mode: str,
  correctness: str = "count",
  preset: str = "paper",
  require_distinct=True,
  confidence_sum_le_one=True,
  format_penalty=0.0,
  weights=(0.5, 0.5, 0.5),
) -> Scores:
  """Every METHOD §3 reward component for a batch, vectorised.

  ``mode``, ``correctness`` and ``preset`` are static (they change the
  computation); the gates, penalty and weights are traced, so changing them
  does not recompile.

  Args:
    entry_ids: int [B, A], matched gold entry e_i (-1 none).
    answer_keys: int [B, A], ids of normalised answers (equal id = equal
      answer) for the distinctness flag u.
    confidences: float [B, A], q_i; NaN where missing (read as 0).
    format_ok: bool [B], f.
    mode: one of ``prompts.MODES``.
    correctness: ``count``, ``count_over_k`` or ``any``.
    preset: ``paper`` or ``reference``.
    require_distinct: bool scalar, see ``RewardConfig``.
    confidence_sum_le_one: bool scalar, see ``RewardConfig``.
    format_penalty: paper-preset total of a format failure.
    weights: (w_f, w_a, w_b) of the reference preset.

  Returns:
    ``Scores`` (without the host-side ``entry_id`` and ``answer_key``);
    ``slot`` is each slot's own part of the total (``_slot_parts``),
    ``slot_cal`` the calibration share of it.
  """
  a = entry_ids.shape[-1]
  f = format_ok.astype(bool)
  c = entry_ids >= 0
  earlier = jnp.tril(jnp.ones((a, a), bool), -1)  # [i, j]: j < i
  same_entry = entry_ids[:, :, None] == entry_ids[:, None, :]
  first = c & ~jnp.any(same_entry & earlier, axis=-1)
  d = first.sum(-1).astype(jnp.float32)
  same_key = answer_keys[:, :, None] == answer_keys[:, None, :]
  u = ~jnp.any(same_key & earlier, axis=(-2, -1))
  q = jnp.where(jnp.isnan(confidences), 0.0, confidences).astype(jnp.float32)
  conf_sum = q.sum(-1)
  brier = jnp.mean((q - c.astype(jnp.float32)) ** 2, axis=-1)

  r_acc = {"count": d, "count_over_k": d / a, "any": (d >= 1) * 1.0}
  require_distinct = jnp.asarray(require_distinct, bool)
  acc_gated = ~f
  if mode == "multi_rlcr":
    acc_gated = acc_gated | (require_distinct & ~u)
  acc = jnp.where(acc_gated, 0.0, r_acc[correctness])

  calibrated = prompts.has_confidence(mode)
  sum_exceeded = conf_sum > 1.0 + SUM_TOL
  brier_gated = (
    ~f
    | (require_distinct & ~u)
    | (jnp.asarray(confidence_sum_le_one, bool) & sum_exceeded)
  )
  if not calibrated:
    brier_gated = jnp.ones_like(f)
    brier = jnp.full_like(brier, jnp.nan)

  total = _total(
    preset, f, acc, brier, brier_gated, calibrated, format_penalty, weights
  )
  slot, slot_cal, decomposable = _slot_parts(
    first, c, q, acc_gated, brier_gated, f, total,
    a=a, correctness=correctness, preset=preset, calibrated=calibrated,
    weights=weights,
  )  # fmt: skip
  flt = lambda x: x.astype(jnp.float32)
  return Scores(
    total=flt(total),
    slot=flt(slot),
    slot_cal=flt(slot_cal),
    decomposable=flt(decomposable),
    format_ok=flt(f),
    distinct=flt(u),
    num_correct=d,
    acc=flt(acc),
    acc_gated=flt(acc_gated),
    brier=flt(brier),
    brier_gated=flt(brier_gated),
    sum_exceeded=flt(sum_exceeded),
    conf_sum=conf_sum,
    correct=flt(c),
    confidence=q,
  )


def _slot_parts(
  first, c, q, acc_gated, brier_gated, f, total, *, a, correctness, preset,
  calibrated, weights,
):  # fmt: skip
  """Each answer slot's own part of the total (per-answer credit, METHOD §10).

  ``slot`` [B, A] is slot i's correctness term (``first_i`` for ``count``,
  ``first_i / A`` for ``count_over_k``; times w_a under ``reference``) plus
  its share of the Brier term (``-(q_i - c_i)^2 / A`` under ``paper``,
  ``w_b (1 - (q_i - c_i)^2) / A`` under ``reference``) on the completions
  whose reward decomposes: format valid and no gate tripped
  (``decomposable``). On the others the reward is one event of the whole
  sequence; it is split evenly between the slots so that every row's parts
  add up the same way (the group baselines of ``advantage.slot_advantages``
  read them; those rows' tokens keep the sequence advantage). For every
  row, total = shared + Σ_i slot_i, with shared = w_f f under
  ``reference`` and 0 under ``paper``. ``any`` is not additive (one correct
  slot makes the others worthless): no row decomposes.

  Returns (slot, cal, decomposable): ``cal`` [B, A] is the calibration
  share of each part (the Brier term's; 0 without confidences and on rows
  that do not decompose), so slot − cal is the correctness share
  (``rl.credit='decoupled'``).
  """
  if preset == "paper":
    shared = jnp.zeros(f.shape, jnp.float32)
  else:
    shared = weights[0] * f.astype(jnp.float32)
  even = jnp.broadcast_to(((total - shared) / a)[:, None], first.shape)
  zero = jnp.zeros(first.shape, jnp.float32)
  if correctness == "any":
    return even, zero, jnp.zeros(f.shape, bool)
  acc = first.astype(jnp.float32)
  if correctness == "count_over_k":
    acc = acc / a
  sq = (q - c.astype(jnp.float32)) ** 2 / a
  if preset == "paper":
    cal = -sq if calibrated else zero
  else:
    _, w_a, w_b = weights
    acc = w_a * acc
    cal = w_b * (1.0 / a - sq) if calibrated else zero
  ok = f & ~acc_gated & (~brier_gated if calibrated else True)
  part = jnp.where(ok[:, None], acc + cal, even)
  return part, jnp.where(ok[:, None], cal, 0.0), ok


# ------------------------------------------------------------- host driver


def _bucket(n: int) -> int:
  """Pads the batch to a power of two (>= 8) so compiles stay few."""
  return max(8, 1 << (max(n, 1) - 1).bit_length())


def _match_all(matcher, answers, gold, tests) -> list[int]:
  """Entry index per (completion, slot) pair; -1 for missing answers."""
  jobs = [
    (ans, gold[b], None if tests is None else tests[b])
    for b, row in enumerate(answers)
    for ans in row
  ]
  run = lambda j: -1 if not j[0] else int(matcher.match(*j))
  if not matcher.parallel:
    return [run(j) for j in jobs]
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
    return list(pool.map(run, jobs))


def encode(parsed: Sequence[Parsed], gold, cfg, tests=None) -> dict:
  """Host arrays for the kernel from parsed completions.

  Returns:
    Dict with ``entry_ids``, ``answer_keys`` (int32 [B, A]; keys are
    batch-global ids of normalised answers, -1 for a missing answer),
    ``confidences`` (float32 [B, A]) and ``format_ok`` (bool [B]).
  """
  matcher = matchers.get(cfg.matcher)
  answers = [p.answers for p in parsed]
  ids = np.array(_match_all(matcher, answers, gold, tests), np.int32)
  ids = ids.reshape(len(parsed), cfg.slots)
  key_ids: dict[str, int] = {}
  keys = np.array(
    [
      -1 if not ans else key_ids.setdefault(matcher.key(ans), len(key_ids))
      for row in answers
      for ans in row
    ],
    np.int32,
  ).reshape(ids.shape)
  if matcher.own_entry:
    ids = np.where(ids >= 0, keys, -1).astype(np.int32)
  return dict(
    entry_ids=ids,
    answer_keys=keys,
    confidences=np.array([p.confidences for p in parsed], np.float32),
    format_ok=np.array([p.format_ok for p in parsed], bool),
  )


def score_texts(texts, gold, cfg: RewardConfig, tests=None) -> Scores:
  """Parses, matches and scores completions (METHOD §3).

  Args:
    texts: B completion strings.
    gold: B gold sets; ``gold[b]`` is a list of entries, each a list of
      alias strings.
    cfg: reward settings.
    tests: optional B test strings (``code`` matcher).

  Returns:
    ``Scores`` of numpy arrays, ``entry_id`` and ``answer_key`` included.
  """
  texts = list(texts)
  if len(gold) != len(texts):
    raise ValueError(f"gold has {len(gold)} rows for {len(texts)} texts")
  if tests is not None and len(tests) != len(texts):
    raise ValueError(f"tests has {len(tests)} rows for {len(texts)} texts")
  enc = encode([parse(t, cfg) for t in texts], gold, cfg, tests)
  n, pad = len(texts), _bucket(len(texts)) - len(texts)
  padded = [
    np.pad(enc[k], [(0, pad)] + [(0, 0)] * (enc[k].ndim - 1))
    for k in ("entry_ids", "answer_keys", "confidences", "format_ok")
  ]
  out = set_reward_kernel(*padded, **cfg.kernel_kwargs())
  return jax.tree.map(lambda v: np.asarray(v)[:n], out).replace(
    entry_id=enc["entry_ids"], answer_key=enc["answer_keys"]
  )
