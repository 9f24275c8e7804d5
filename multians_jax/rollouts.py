"""One RL step's rollouts: sample → decode → score → gather, and dynamic
sampling (``rl.dynamic_sampling``).

Rows are prompt-major (p·G + g), as ``sampler.Rollout``. ``Scored`` keeps
the global rollout (device arrays, sharded as the sampler left them) next
to every row's scores (host arrays, the same on every process).

Dynamic sampling, set-aware. A completion *succeeds* when its gated
correctness is positive (format-valid and at least one gold answer among
its answers, distinctness gate passed). A group whose completions all
succeed, or all fail, carries no binary learning signal; the shaped total
(format, Brier) still varies inside such a group, so filtering on the
total would keep all-fail groups alive. Such groups are dropped and the
batch is refilled with groups of further prompts from the stream, at most
``max_rounds`` extra sampling rounds per step. Kept groups keep their
order of arrival; if the rounds run out first, the shortfall is filled
with dropped groups whose completion mask and advantages are zeroed, so
the update's shape never changes and they add neither gradient nor
tokens to the loss's denominator.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from multians_jax import credit, evaluate, sampler, sharding


@dataclasses.dataclass(frozen=True)
class Scored:
  """A batch's rollout and every row's scores.

  Attributes:
    rollout: the global ``sampler.Rollout`` [B, ...].
    scores: host arrays with B rows: ``reward.score_texts``'s keys,
      ``lengths``, ``truncated`` and, under answer credit, ``token_slot``.
    seconds: wall time of (sampling, decoding + scoring + gathering).
  """

  rollout: sampler.Rollout
  scores: dict
  seconds: tuple[float, float] = (0.0, 0.0)


def sample_chunked(model, batch, key, scfg, g, mesh, chunk) -> sampler.Rollout:
  """Samples the batch's prompts ``chunk`` at a time (bounds the KV cache)."""
  p = batch.tokens.shape[0]
  chunk = chunk or p
  parts = [
    sampler.sample(
      model,
      batch.tokens[i : i + chunk],
      batch.mask[i : i + chunk],
      jax.random.fold_in(key, i),
      scfg,
      num_samples=g,
      mesh=mesh,
    )
    for i in range(0, p, chunk)
  ]
  return _concat(parts)


def sample_and_score(run, model, batch, tok, scfg, key, mesh) -> Scored:
  """Samples G completions per prompt, scores this process's rows and
  gathers every row's scores onto every process."""
  g = run.rl.num_generations
  t0 = time.perf_counter()
  rollout = sample_chunked(
    model, batch, key, scfg, g, mesh, run.rl.sample_chunk
  )
  jax.block_until_ready(rollout)
  t1 = time.perf_counter()
  bounds = sharding.row_bounds(len(batch.gold), g)
  local = jax.tree.map(lambda x: sharding.local_rows(x, bounds), rollout)
  texts = evaluate.decode(tok, local)
  gold = [gs for gs in batch.gold for _ in range(g)]
  tests = [ts for ts in batch.tests for _ in range(g)]
  scores = evaluate.score_rows(texts, gold, tests, run.reward, bounds)
  scores.update(lengths=local.lengths, truncated=local.truncated)
  if run.rl.credit != "sequence":
    scores["token_slot"] = credit.token_slots(
      tok, local, texts, scores["format_ok"] > 0, run.reward
    )
  scores = evaluate.gather_scores(scores, bounds)
  return Scored(rollout, scores, (t1 - t0, time.perf_counter() - t1))


def flat_groups(scores: dict, g: int) -> np.ndarray:
  """bool [P]: every completion of the group succeeds, or none does."""
  ok = (np.asarray(scores["acc"]) > 0).reshape(-1, g)
  return ok.all(axis=1) | ~ok.any(axis=1)


def dynamic_fill(
  first: Scored, more: Callable[[int], Scored], g: int, max_rounds: int
) -> tuple[Scored, np.ndarray, dict]:
  """Replaces groups with a flat binary outcome by groups of new prompts.

  Args:
    first: the step's first batch of P prompts.
    more: ``more(r)`` samples and scores round r ≥ 1 (P new prompts).
    g: completions per prompt.
    max_rounds: extra rounds at most (0: only the first batch).

  Returns:
    ``(scored, live, info)``: P groups (``seconds`` summed over the
    rounds); ``live`` bool [B] is False on the rows of groups kept only
    to fill a shortfall (their mask is zeroed here, their advantages must
    be zeroed by the caller); ``info`` holds
    ``dynamic/filtered_frac`` (flat groups among all sampled),
    ``dynamic/rounds`` (extra rounds used) and ``dynamic/filler_frac``.
  """
  p = len(first.scores["acc"]) // g
  rounds, kept, dropped, n_flat = [first], [], [], 0
  while True:
    r = len(rounds) - 1
    flat = flat_groups(rounds[r].scores, g)
    n_flat += int(flat.sum())
    kept += [(r, i) for i in np.flatnonzero(~flat)]
    dropped += [(r, i) for i in np.flatnonzero(flat)]
    if len(kept) >= p or r >= max_rounds:
      break
    rounds.append(more(r + 1))
  filler = max(p - len(kept), 0)
  picks = kept[:p] + dropped[len(dropped) - filler :]
  live = np.repeat(np.arange(p) < p - filler, g)
  info = {
    "dynamic/filtered_frac": n_flat / (p * len(rounds)),
    "dynamic/rounds": float(len(rounds) - 1),
    "dynamic/filler_frac": filler / p,
  }
  if len(rounds) == 1 and picks == [(0, i) for i in range(p)]:
    return first, live, info  # nothing dropped: no copy
  return _select(rounds, picks, g, live), live, info


def _select(rounds: list[Scored], picks, g: int, live: np.ndarray) -> Scored:
  """Concatenates the picked groups (round, group) of several rounds."""
  rows = np.concatenate(
    [np.arange(i * g, (i + 1) * g) + _offset(rounds, r) for r, i in picks]
  ).astype(np.int32)
  t = max(s.rollout.prompt_tokens.shape[1] for s in rounds)
  cat = _concat([_pad_prompts(s.rollout, t) for s in rounds])
  rollout = _take(cat, rows, live)  # host arrays: replicated jit inputs
  keys = rounds[0].scores.keys()
  scores = {
    k: np.concatenate([np.asarray(s.scores[k]) for s in rounds])[rows]
    for k in keys
  }
  secs = tuple(sum(x.seconds[i] for x in rounds) for i in range(2))
  return Scored(rollout, scores, secs)


def _offset(rounds, r):
  return sum(len(s.scores["acc"]) for s in rounds[:r])


def _pad_prompts(ro: sampler.Rollout, t: int) -> sampler.Rollout:
  """Left-pads the prompt arrays to ``t`` columns (positions come from
  the mask, so left padding changes nothing)."""
  extra = t - ro.prompt_tokens.shape[1]
  if extra == 0:
    return ro
  return ro.replace(
    prompt_tokens=jnp.pad(ro.prompt_tokens, ((0, 0), (extra, 0))),
    prompt_mask=jnp.pad(ro.prompt_mask, ((0, 0), (extra, 0))),
  )


def _concat(parts: list[sampler.Rollout]) -> sampler.Rollout:
  """Rows of several rollouts (equal prompt widths) in order."""
  if len(parts) == 1:
    return parts[0]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)


@jax.jit
def _take(ro: sampler.Rollout, rows, live) -> sampler.Rollout:
  out = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), ro)
  return out.replace(mask=out.mask & live[:, None])
