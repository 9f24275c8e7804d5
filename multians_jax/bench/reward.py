"""Benchmark of the full reward path: parse + exact match + kernel
(``tools/bench_reward.py``, ``tools/bench.py reward``). Target: 1,024
completions of ~1,000 characters with K = 3 in under 0.5 s (after the
first call's jit compile).
"""

from __future__ import annotations

import random
import time

from multians_jax.data import prompts
from multians_jax.rl import matchers, reward

_WORDS = (
  "the patient presents with fever cough and shortness of breath so we "
  "consider several causes ranked by likelihood given the history"
).split()
_GOLD = [["Pneumonia", "community acquired pneumonia"], ["Influenza", "flu"]]
_CANDIDATES = ["pneumonia", "Flu", "Asthma", "Bronchitis", "influenza", "COPD"]


def _completion(rng: random.Random, chars: int, k: int) -> str:
  answers = rng.sample(_CANDIDATES, k) if k <= len(_CANDIDATES) else None
  answers = answers or [rng.choice(_CANDIDATES) for _ in range(k)]
  confs = [round(rng.random() / k, 3) for _ in range(k)]
  tail = prompts.format_completion("multi_rlcr", answers, confs, think="")
  words, size = [], len(tail)
  while size < chars:
    words.append(rng.choice(_WORDS))
    size += len(words[-1]) + 1
  think = "<think>" + " ".join(words) + "</think>"
  return think + tail[len("<think></think>") :]


def bench_reward(num: int = 1024, chars: int = 1000, k: int = 3) -> dict:
  """Times ``reward.score_texts`` on synthetic Multi-RLCR completions.

  Args:
    num: number of completions.
    chars: approximate characters per completion.
    k: answers per completion.

  Returns:
    Dict with the first call (including jit compile) and the median of five
    warm calls in seconds, and warm completions per second.
  """
  rng = random.Random(0)
  texts = [_completion(rng, chars, k) for _ in range(num)]
  gold = [_GOLD] * num
  cfg = reward.RewardConfig(mode="multi_rlcr", num_answers=k)
  start = time.perf_counter()
  out = reward.score_texts(texts, gold, cfg)
  first = time.perf_counter() - start
  times = []
  for _ in range(5):
    matchers.normalize_answer.cache_clear()
    start = time.perf_counter()
    reward.score_texts(texts, gold, cfg)
    times.append(time.perf_counter() - start)
  warm = sorted(times)[len(times) // 2]
  return dict(
    num=num,
    chars=sum(map(len, texts)) / num,
    k=k,
    first_call_s=first,
    warm_s=warm,
    completions_per_s=num / warm,
    format_valid_rate=float(out.format_ok.mean()),
  )
