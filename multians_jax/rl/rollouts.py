"""Rollouts and their scoring: sample → decode → score → gather
(``score_rollout`` → ``Rewards``, the one scoring path of training,
evaluation and the benchmark), and dynamic sampling
(``rl.dynamic_sampling``).

Rows are prompt-major (p·G + g), as ``sampler.Rollout``, which carries
each prompt once. ``Scored`` keeps the global rollout (device arrays,
sharded as the sampler left them) next to every row's ``Rewards`` (host
arrays, the same on every process).

Multi-process: each process decodes and scores its own whole groups of
rows (``sharding.row_bounds``, read from its addressable shards) and the
numeric scores are all-gathered.

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
from flax import struct

from multians_jax import metrics, sharding
from multians_jax.model import sampler
from multians_jax.rl import credit, loss, matchers, parsing, reward


@struct.dataclass
class Rewards:
  """Every row's scores, the same on every process (host arrays, B rows,
  prompt-major). The one output of scoring: training, evaluation and the
  benchmark all get it from ``score_rollout``.

  Attributes:
    scores: ``reward.score_texts``'s ``reward.Scores``.
    lengths: int [B] completion tokens.
    truncated: bool [B] cut by the length limit.
    token_slot: int32 [B, L] answer slot of each completion token
      (``credit.token_slots``), under answer credit; else None.
    answer_p: float32 [B, A] p(a_i|q) of each parsed answer under the
      record's known distribution (``answer_probs``); None when no record
      of the batch has one.
    answer_p_train: float32 [B, A] the same under the distribution's
      ``train_probs`` (the training split's gold frequencies, the lab's);
      None when no record has them.
    texts: this process's decoded completions (its rows only; not gathered).
  """

  scores: reward.Scores
  lengths: np.ndarray
  truncated: np.ndarray
  token_slot: np.ndarray | None = None
  answer_p: np.ndarray | None = None
  answer_p_train: np.ndarray | None = None
  texts: tuple = struct.field(pytree_node=False, default=())

  @property
  def num_rows(self) -> int:
    return len(self.lengths)


def score_rollout(tok, rollout, gold, tests, rcfg, g, *, token_slots=False,
                  metas=None) -> Rewards:  # fmt: skip
  """Decodes and scores this process's rows of a global rollout and
  gathers every row's scores onto every process.

  Args:
    tok: the tokenizer.
    rollout: the global ``sampler.Rollout`` of P prompts × ``g`` rows.
    gold / tests: per prompt (P entries), as ``data.PromptBatch``.
    rcfg: ``reward.RewardConfig``.
    g: completions per prompt.
    token_slots: also ``Rewards.token_slot`` (answer credit).
    metas: per-prompt record metas; ``Rewards.answer_p`` when one holds a
      known answer distribution.
  """
  bounds = sharding.row_bounds(len(gold), g)
  local = jax.tree.map(lambda x: sharding.local_rows(x, bounds), rollout)
  texts = decode(tok, local)
  rows = lambda xs: [x for x in xs for _ in range(g)]  # noqa: E731
  scores = score_rows(texts, rows(gold), rows(tests), rcfg, bounds)
  slot = probs = train = None
  if token_slots:
    ok = scores.format_ok > 0
    slot = credit.token_slots(tok, local, texts, ok, rcfg)
  dists = [(m or {}).get("distribution") or {} for m in metas or ()]
  if any(dists):
    lo = bounds[jax.process_index()]
    mine = rows(metas)[lo : lo + len(texts)]
    if any("train_probs" in d for d in dists):
      probs, train = answer_probs(texts, mine, rcfg, ("probs", "train_probs"))
    else:
      (probs,) = answer_probs(texts, mine, rcfg)
  mine = Rewards(
    scores,
    np.asarray(local.lengths),
    np.asarray(local.truncated),
    slot,
    probs,
    train,
  )
  return gather(mine, bounds).replace(texts=tuple(texts))


def gather(r: Rewards, bounds) -> Rewards:
  """Every process's rows, in row order, on every process.

  ``answer_key`` ids are numbered per scoring call; each block's are
  shifted past the previous blocks' so keys stay distinct across blocks
  (metrics compare keys only within a group, which never spans blocks).
  """
  out = sharding.gather_rows(r.replace(texts=()), bounds)
  if len(bounds) == 2:
    return out
  keys = np.asarray(out.scores.answer_key).copy()
  offset = 0
  for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
    block = keys[lo:hi]
    block[block >= 0] += offset
    offset = max(offset, int(block.max(initial=-1)) + 1)
  return out.replace(scores=out.scores.replace(answer_key=keys))


def score_rows(texts, gold, tests, rcfg, bounds) -> reward.Scores:
  """``score_texts`` of this process's rows (``texts``) against the rows
  ``bounds[i]:bounds[i+1]`` of the batch-wide ``gold`` / ``tests``."""
  lo = bounds[jax.process_index()]
  if not texts:  # more processes than groups: an empty block, same keys
    sc = reward.score_texts([""], gold[:1], rcfg, tests=tests[:1])
    return jax.tree.map(lambda v: v[:0], sc)
  hi = lo + len(texts)
  return reward.score_texts(texts, gold[lo:hi], rcfg, tests=tests[lo:hi])


def decode(tokenizer, rollout: sampler.Rollout) -> list[str]:
  """Completion texts (special tokens dropped), one per row."""
  toks, lengths = np.asarray(rollout.tokens), np.asarray(rollout.lengths)
  return tokenizer.batch_decode(
    [t[:n].tolist() for t, n in zip(toks, lengths, strict=True)],
    skip_special_tokens=True,
  )


def answer_probs(texts, metas, rcfg: reward.RewardConfig,
                 fields=("probs",)) -> tuple[np.ndarray, ...]:  # fmt: skip
  """One [B, A] array per field of ``fields``: each parsed answer's
  ``meta["distribution"][field]`` (p(a_i|q) for ``probs``); 0 for an
  answer outside the distribution, a missing answer or a record without
  the field. Each text is parsed and matched once for every field."""
  matcher = matchers.get(rcfg.matcher)
  out = np.zeros((len(fields), len(texts), rcfg.slots), np.float32)
  for i, (text, meta) in enumerate(zip(texts, metas, strict=True)):
    dist = (meta or {}).get("distribution")
    have = [f for f, name in enumerate(fields) if name in (dist or {})]
    if not have:
      continue
    entries = [[name] for name in dist["answers"]]
    for j, ans in enumerate(parsing.parse(text, rcfg).answers):
      e = matcher.match(ans, entries, None) if ans else -1
      for f in have if e >= 0 else ():
        out[f, i, j] = dist[fields[f]][e]
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Scored:
  """A batch's rollout and every row's scores.

  Attributes:
    rollout: the global ``sampler.Rollout`` [B, ...].
    rewards: every row's ``Rewards``.
    seconds: wall time of (sampling, decoding + scoring + gathering).
  """

  rollout: sampler.Rollout
  rewards: Rewards
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
  """Samples G completions per prompt (``rl.sample_chunk`` prompts at a
  time) and scores them (``score_rollout``)."""
  g = run.rl.num_generations
  t0 = time.perf_counter()
  rollout = sample_chunked(
    model, batch, key, scfg, g, mesh, run.rl.sample_chunk
  )
  jax.block_until_ready(rollout)
  t1 = time.perf_counter()
  rewards = score_rollout(
    tok,
    rollout,
    batch.gold,
    batch.tests,
    run.reward,
    g,
    token_slots=run.rl.credit != "sequence",
    metas=batch.metas,
  )
  return Scored(rollout, rewards, (t1 - t0, time.perf_counter() - t1))


def advantages(run, scored: Scored, num_prompts: int, live=None, step=0):
  """(advantages, info) of a scored step under the run's ``rl.advantage``,
  ``rl.credit`` and ``rl.credit_baseline`` (``credit.rollout_advantages``:
  [B] per sequence, [B, L] per token), with ``rl.conf_entropy_coef``'s
  bonus at optimizer step ``step`` (``credit.confidence_entropy_bonus``);
  ``live`` (dynamic sampling's filler mask) zeroes filler groups. Host
  values, equal everywhere."""
  rl = run.rl
  adv, info = credit.rollout_advantages(
    scored.rewards.scores,
    num_prompts,
    token_slot=scored.rewards.token_slot,
    kind=rl.advantage,
    credit=rl.credit,
    baseline=rl.credit_baseline,
    reward_cfg=run.reward,
    pass_k=rl.pass_k,
    conf_scale=rl.conf_adv_scale,
  )
  if rl.conf_entropy_coef:
    beta = loss.linear_decay(
      rl.conf_entropy_coef, rl.conf_entropy_decay_steps, step
    )
    adv, binfo = credit.confidence_entropy_bonus(
      adv,
      scored.rewards.token_slot,
      sharding.host_array(scored.rollout.logprobs),
      run.reward.num_answers,
      float(beta),
    )
    info = {**info, **binfo}
  if live is not None:  # filler groups: no gradient
    adv = adv * (live[:, None] if adv.ndim == 2 else live)
  return adv, info


def step_metrics(scored: Scored, group_size: int) -> dict[str, float]:
  """What one step's rollouts did: ``metrics.summarize`` of the rewards,
  per-slot figures (``metrics.slot_summary``), the sampler's throughput
  and the truncation rate."""
  r = scored.rewards
  out = metrics.summarize(r.scores, r.lengths, group_size=group_size)
  if r.scores.answer_key is not None:
    out.update(metrics.slot_summary(r.scores, group_size, r.answer_p))
  out.update(
    tokens_per_sec=float(np.sum(r.lengths)) / max(scored.seconds[0], 1e-9),
    truncation_rate=float(np.mean(r.truncated)),
  )
  return out


def flat_groups(rewards: Rewards, g: int) -> np.ndarray:
  """bool [P]: every completion of the group succeeds, or none does."""
  ok = (np.asarray(rewards.scores.acc) > 0).reshape(-1, g)
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
  p = first.rewards.num_rows // g
  rounds, kept, dropped, n_flat = [first], [], [], 0
  while True:
    r = len(rounds) - 1
    flat = flat_groups(rounds[r].rewards, g)
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
  rewards = jax.tree.map(
    lambda *xs: np.concatenate([np.asarray(x) for x in xs])[rows],
    *[s.rewards.replace(texts=()) for s in rounds],
  )
  secs = tuple(sum(x.seconds[i] for x in rounds) for i in range(2))
  return Scored(rollout, rewards, secs)


def _offset(rounds, r):
  return sum(s.rewards.num_rows for s in rounds[:r])


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
  """The ``rows`` (whole groups, in order) of ``ro`` and their prompts;
  rows not ``live`` keep no completion tokens."""
  g = ro.group_size
  take = lambda x, i: jnp.take(x, i, axis=0)
  return sampler.Rollout(
    prompt_tokens=take(ro.prompt_tokens, rows[::g] // g),
    prompt_mask=take(ro.prompt_mask, rows[::g] // g),
    tokens=take(ro.tokens, rows),
    logprobs=take(ro.logprobs, rows),
    mask=take(ro.mask, rows) & live[:, None],
    lengths=take(ro.lengths, rows),
    truncated=take(ro.truncated, rows),
  )
