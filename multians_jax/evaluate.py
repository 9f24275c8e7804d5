"""Held-out evaluation: the sampler + reward, reduced with ``metrics``.

Shape letters: P prompts, G generations pooled per prompt, B = P·G, A
answer slots (K of the paper).

Multi-process: every process reads the same records and samples them as
one global batch, scored as training scores (``rollouts.score_rollout``:
each process decodes and scores its own groups of rows, the numeric scores
are gathered), so the summary covers every row on every process (process 0
writes it).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from multians_jax import hostmem, metrics, settings
from multians_jax.data import pipeline as data
from multians_jax.model import sampler
from multians_jax.rl import reward, rollouts

# This module's settings (defined in the leaf settings.py).
EvalConfig = settings.EvalConfig


@dataclasses.dataclass
class EvalResult:
  summary: dict  # flat floats (metrics.summarize + counts)
  scores: reward.Scores  # over all B rows
  texts: list  # completions of this process's rows (all rows on one host)
  lengths: np.ndarray  # [B]
  details: dict = dataclasses.field(default_factory=dict)  # see to_json


def run(
  model,
  tokenizer,
  records,
  rcfg: reward.RewardConfig,
  cfg: EvalConfig,
  *,
  seed: int = 0,
  mesh=None,
  stop_ids=(),
  pad_id=0,
) -> EvalResult:
  """Samples G completions for each of the first N records and scores them."""
  hostmem.release()
  records = list(records)[: cfg.num_prompts]
  pcfg = data.PipelineConfig(
    batch_size=min(cfg.batch_prompts, len(records)),
    mode=rcfg.mode,
    num_answers=rcfg.num_answers,
    max_prompt_len=cfg.max_prompt_len,
    min_bucket=cfg.min_bucket,
    shuffle=False,
    num_epochs=1,
  )
  it = data.PromptIterator(records, tokenizer, pcfg)
  scfg = dataclasses.replace(
    cfg.sampling, stop_ids=tuple(stop_ids), pad_id=pad_id
  )
  g = cfg.num_generations
  parts, batches = [], []
  key = jax.random.key(seed)
  for i, batch in enumerate(it):
    k = jax.random.fold_in(key, i)
    r = sampler.sample(
      model, batch.tokens, batch.mask, k, scfg, num_samples=g, mesh=mesh
    )
    parts.append(
      rollouts.score_rollout(
        tokenizer, r, batch.gold, batch.tests, rcfg, g, metas=batch.metas
      )
    )
    batches.append(batch)
  scores = jax.tree.map(
    lambda *xs: np.concatenate(xs), *[p.scores for p in parts]
  )
  lengths = np.concatenate([p.lengths for p in parts])
  gold = [gs for b in batches for gs in b.gold]
  a = np.asarray(scores.entry_id).shape[1]  # answer slots (1 in rlvr)
  ks = [a * n for n in range(1, g + 1)]
  summary = metrics.summarize(
    scores,
    lengths,
    group_size=g,
    num_gold=np.array([len(x) for x in gold]),
    ks=ks,
  )
  summary.update(
    num_prompts=len(gold),
    num_dropped=it.num_dropped,
    truncation_rate=float(np.mean(lengths >= scfg.max_new_tokens)),
  )
  calibrated = not np.all(np.isnan(scores.brier))
  if any(p.answer_p is not None for p in parts):
    summary.update(_known_distribution(parts, batches, scores, g, ks))
  texts = [t for p in parts for t in p.texts]
  details = _details(scores, g, calibrated)
  return EvalResult(summary, scores, texts, lengths, details)


def _known_distribution(parts, batches, scores, g, ks) -> dict:
  """``metrics.distribution_summary`` from the records' answer
  distributions (``meta["distribution"]``; records without one count as
  p = 0 for every answer), and their training frequencies where the
  distributions carry them (``train_probs``)."""

  def rows(field):
    return np.concatenate(
      [
        getattr(p, field)
        if getattr(p, field) is not None
        else np.zeros(p.scores.entry_id.shape, np.float32)
        for p in parts
      ]
    )

  has_train = any(p.answer_p_train is not None for p in parts)
  probs = [
    (m.get("distribution") or {}).get("probs", [])
    for b in batches
    for m in b.metas
  ]
  width = max(map(len, probs))
  padded = np.array([list(p) + [0.0] * (width - len(p)) for p in probs])
  return metrics.distribution_summary(
    rows("answer_p"),
    scores.answer_key,
    scores.format_ok,
    scores.confidence,
    padded,
    group_size=g,
    ks=ks,
    calibrated=not np.all(np.isnan(scores.brier)),
    train_p=rows("answer_p_train") if has_train else None,
  )


def _details(scores, g: int, calibrated: bool) -> dict:
  """Per-prompt unique answers at the full budget and reliability bins."""
  f = np.asarray(scores.format_ok) > 0
  keys = np.where(f[:, None], scores.answer_key, -1)
  b, a = keys.shape
  grouped = keys.reshape(b // g, g, a)
  out = {
    "budget": a * g,
    "unique": metrics.unique_answers(grouped, a * g).tolist(),
  }
  if calibrated and f.any():
    out["reliability"] = metrics.reliability_bins(
      np.asarray(scores.confidence)[f], np.asarray(scores.correct)[f]
    )
  return out


def to_json(result: EvalResult, **info) -> dict:
  """The evaluation file layout read by ``tools/compare.py``: ``info``
  (tag, step, mode, num_answers, seed, ...), ``summary`` and ``details``."""
  return {**info, "summary": result.summary, "details": result.details}


def write_json(path: str, result: EvalResult, **info) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(_finite(to_json(result, **info)), f, indent=1)
  os.replace(tmp, path)


def _finite(x):
  """JSON-ready copy: numpy scalars as Python, NaN and inf as null."""
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [_finite(v) for v in x]
  if isinstance(x, float | np.floating):
    return float(x) if np.isfinite(x) else None
  if isinstance(x, np.integer):
    return int(x)
  return x
