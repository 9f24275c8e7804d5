"""Optional supervised format warm-up before RL (``config.warmup``).

Small models (e.g. SmolLM2-135M) never emit the multi-answer format on
their own, so every completion scores 0, all group advantages are 0 and RL
has no signal. A few supervised steps on well-formed completions built from
*training* questions teach the layout; RL then optimises coverage and
calibration. Targets hold up to K gold answers (first alias, random order)
filled with answers of other questions when the gold set is smaller, with
confidences 0.7 / 0.1 for gold / filler answers: the warm-up teaches the
format, not the answers' calibration, which RL then learns from the reward.

Shape letters: P prompts, T prompt bucket, L target tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from multians_jax import loss, prompts


@dataclasses.dataclass(frozen=True)
class WarmupConfig:
  steps: int = 0  # 0 = no warm-up
  lr: float = 1e-4  # AdamW learning rate (constant)
  batch_prompts: int = 8  # prompts per warm-up step
  max_target_len: int = 96  # target tokens (longer targets are cut)

  def __post_init__(self):
    if self.steps < 0 or self.lr <= 0 or self.max_target_len < 8:
      raise ValueError(f"warmup: invalid settings {self}")


def target_text(gold, others, mode: str, k: int, rng) -> str:
  """A well-formed completion for one question (no <think> block)."""
  n = k if prompts.is_multi(mode) else 1
  entries = list(gold)
  rng.shuffle(entries)
  answers = [e[0] for e in entries[:n]]
  conf = [0.7] * len(answers)
  seen = {a.lower() for e in gold for a in e}
  for cand in others:
    if len(answers) >= n:
      break
    if cand.lower() not in seen and cand not in answers:
      answers.append(cand)
      conf.append(0.1)
  while len(answers) < n:  # degenerate data: no fillers available
    answers.append(f"unknown {len(answers)}")
    conf.append(0.0)
  return prompts.format_completion(
      mode, answers, conf if prompts.has_confidence(mode) else None,
      think=None, analysis="Several answers are possible.",
  )  # fmt: skip


def make_batch(batch, tokenizer, mode: str, k: int, max_len: int, seed: int):
  """PromptBatch → (tokens [P, T+L], mask, positions, target mask [P, L])."""
  rng = np.random.default_rng(seed)
  pool = [e[0] for g in batch.gold for e in g]
  eos = tokenizer.eos_token_id
  rows = []
  for gold in batch.gold:
    others = list(pool)
    rng.shuffle(others)
    text = target_text(gold, others, mode, k, rng)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    rows.append(ids[:max_len])
  p = len(rows)
  tgt = np.zeros((p, max_len), np.int32)
  tmask = np.zeros((p, max_len), bool)
  for i, r in enumerate(rows):
    tgt[i, : len(r)] = r
    tmask[i, : len(r)] = True
  tokens = np.concatenate([batch.tokens, tgt], axis=1)
  mask = np.concatenate([batch.mask, tmask], axis=1)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return tokens, mask, positions, tmask


@functools.partial(
  jax.jit, static_argnames=("graphdef", "tx", "chunk"), donate_argnums=(1, 2)
)
def sft_step(graphdef, params, opt_state, tokens, mask, positions, tmask, *,
             tx, chunk=128):  # fmt: skip
  """One step of mean next-token cross-entropy on the target tokens."""
  start = tokens.shape[1] - tmask.shape[1] - 1

  def objective(params):
    m = nnx.merge(graphdef, params)
    logp = loss.token_logprobs(m, tokens, positions, mask, chunk=chunk,
                               start=start)  # fmt: skip
    return -jnp.sum(logp * tmask) / jnp.maximum(jnp.sum(tmask), 1)

  value, grads = jax.value_and_grad(objective)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, value


def optimizer(cfg: WarmupConfig):
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(cfg.lr))
