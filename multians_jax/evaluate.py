"""Held-out evaluation: the sampler + reward, reduced with ``metrics``.

Shape letters: P prompts, G generations pooled per prompt, B = P·G, A
answer slots (K of the paper).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from multians_jax import data, metrics, reward, sampler


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  num_prompts: int = 64  # held-out prompts (the first N in source order)
  num_generations: int = 4  # G generations pooled per prompt
  batch_prompts: int = 8  # prompts per sampler call
  temperature: float = 0.7  # 0 = greedy
  max_new_tokens: int = 256
  max_prompt_len: int = 512
  min_bucket: int = 64
  family: str = "qa"

  def __post_init__(self):
    if self.num_prompts < 1 or self.num_generations < 1:
      raise ValueError("eval.num_prompts and eval.num_generations must be >= 1")


@dataclasses.dataclass
class EvalResult:
  summary: dict  # flat floats (metrics.summarize + counts)
  scores: dict  # score_texts arrays over all B rows
  texts: list  # completions
  lengths: np.ndarray  # [B]


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
  scfg = sampler.SamplingConfig(
    max_new_tokens=cfg.max_new_tokens,
    temperature=cfg.temperature,
    stop_ids=tuple(stop_ids),
    pad_id=pad_id,
  )
  g = cfg.num_generations
  texts, gold, tests, lengths = [], [], [], []
  key = jax.random.key(seed)
  for i, batch in enumerate(it):
    r = sampler.sample(
      model,
      batch.tokens,
      batch.mask,
      jax.random.fold_in(key, i),
      scfg,
      num_samples=g,
      mesh=mesh,
    )
    texts += decode(tokenizer, r)
    lengths.append(np.asarray(r.lengths))
    for gs, ts in zip(batch.gold, batch.tests, strict=True):
      gold += [gs] * g
      tests += [ts] * g
  scores = reward.score_texts(texts, gold, rcfg, tests=tests)
  lengths = np.concatenate(lengths)
  num_gold = np.array([len(x) for x in gold[::g]])
  a = np.asarray(scores["entry_id"]).shape[1]
  summary = metrics.summarize(
    scores,
    lengths,
    group_size=g,
    num_gold=num_gold,
    ks=[a * n for n in range(1, g + 1)],
  )
  summary.update(
    num_prompts=len(gold) // g,
    num_dropped=it.num_dropped,
    truncation_rate=float(np.mean(lengths >= cfg.max_new_tokens)),
  )
  return EvalResult(summary, scores, texts, lengths)


def decode(tokenizer, rollout: sampler.Rollout) -> list[str]:
  """Completion texts (special tokens dropped), one per row."""
  toks, lengths = np.asarray(rollout.tokens), np.asarray(rollout.lengths)
  return tokenizer.batch_decode(
    [t[:n].tolist() for t, n in zip(toks, lengths, strict=True)],
    skip_special_tokens=True,
  )


def plots(result: EvalResult, out_dir: str, g: int) -> list[str]:
  """Reliability diagram and coverage-vs-k plot; returns the file names."""
  os.makedirs(out_dir, exist_ok=True)
  names = []
  s = result.scores
  f = np.asarray(s["format_ok"]) > 0
  if not np.all(np.isnan(s["brier"])) and f.any():
    metrics.plot_reliability(
      os.path.join(out_dir, "reliability.png"),
      np.asarray(s["confidence"])[f],
      np.asarray(s["correct"])[f],
    )
    names.append("reliability.png")
  a = np.asarray(s["entry_id"]).shape[1]
  ks = [a * n for n in range(1, g + 1)]
  curve = [result.summary.get(f"coverage@{k}") for k in ks]
  if all(c is not None for c in curve):
    metrics.plot_coverage_vs_k(
      os.path.join(out_dir, "coverage_vs_k.png"), ks, {"policy": curve}
    )
    names.append("coverage_vs_k.png")
  return names
