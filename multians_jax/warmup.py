"""Optional supervised format warm-up before RL (``config.warmup``).

Small models (e.g. SmolLM2-135M) never emit the multi-answer format on
their own, so every completion scores 0, all group advantages are 0 and RL
has no signal. A few supervised steps on well-formed completions built from
*training* questions teach the layout; RL then optimises coverage and
calibration.

Target answers (``warmup.answers``):

- ``gold``: up to K gold answers (first alias, random order), filled with
  answers of other questions when the gold set is smaller.
- ``distribution``: K distinct answers drawn without replacement from a
  flattened copy of the record's known answer distribution (``meta``
  ``distribution`` and ``distractors``, as the ``distlab`` task writes
  them): weight (p(a) + w)^τ for a plausible answer and w^τ for a
  distractor (τ = ``flatten``, w = ``distractor_weight``), a broad prior
  that RL then has to sharpen.

Target confidences (``warmup.confidences``):

- ``fixed``: 0.7 for a gold answer and 0.1 for a filler. RL rarely moves
  confidences taught this way within a short run.
- ``random``: the first K parts of a uniform Dirichlet over K + 1 parts (a
  single U(0, 1) value in ``rlcr``), floored to a 0.05 grid: Σq < 1 and
  every answer's confidence is independent of whether it is right, so the
  warm-up teaches the format and leaves calibration to RL.

Shape letters: P prompts, T prompt bucket, L target tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

from multians_jax import hostmem, settings, sharding
from multians_jax.data import pipeline as data
from multians_jax.data import prompts
from multians_jax.model import lora
from multians_jax.rl import loss
from multians_jax.rl import update as update_lib

# This module's settings (defined in the leaf settings.py).
ANSWERS = settings.ANSWERS
CONFIDENCES = settings.CONFIDENCES
WarmupConfig = settings.WarmupConfig

CONF_GRID = 0.05  # random confidences are floored to this grid


def _gold_answers(gold, others, n: int, rng) -> tuple[list, list]:
  """Up to n gold answers, then fillers; (answers, is_gold flags)."""
  entries = list(gold)
  rng.shuffle(entries)
  answers = [e[0] for e in entries[:n]]
  flags = [True] * len(answers)
  seen = {a.lower() for e in gold for a in e}
  for cand in others:
    if len(answers) >= n:
      break
    if cand.lower() not in seen and cand not in answers:
      answers.append(cand)
      flags.append(False)
  while len(answers) < n:  # degenerate data: no fillers available
    answers.append(f"unknown {len(answers)}")
    flags.append(False)
  return answers, flags


def _distribution_answers(meta, n: int, cfg: WarmupConfig, rng) -> list:
  """n distinct answers from the flattened known distribution."""
  dist = (meta or {}).get("distribution")
  if not dist:
    raise ValueError(
      "warmup.answers='distribution' needs records whose meta holds a "
      "'distribution' ({'answers': [...], 'probs': [...]}), as distlab's do"
    )
  names = list(dist["answers"]) + list(meta.get("distractors", []))
  probs = list(dist["probs"]) + [0.0] * (len(names) - len(dist["answers"]))
  w = (np.asarray(probs) + cfg.distractor_weight) ** cfg.flatten
  w = np.where(np.asarray(probs) > 0, w, cfg.distractor_weight**cfg.flatten)
  if n > np.count_nonzero(w):
    raise ValueError(
      f"warm-up: {n} distinct answers asked, {np.count_nonzero(w)} possible"
    )
  pick = rng.choice(len(names), size=n, replace=False, p=w / w.sum())
  return [names[i] for i in pick]


def _random_confidences(n: int, multi: bool, rng) -> list[float]:
  q = rng.dirichlet(np.ones(n + 1))[:n] if multi else rng.uniform(size=1)
  return [round(float(np.floor(x / CONF_GRID) * CONF_GRID), 2) for x in q]


def target_text(
  gold, others, mode: str, k: int, rng, cfg=None, meta=None
) -> str:
  """A well-formed completion for one question (no <think> block)."""
  cfg = cfg or WarmupConfig()
  n = k if prompts.is_multi(mode) else 1
  if cfg.answers == "distribution":
    answers = _distribution_answers(meta, n, cfg, rng)
    flags = [True] * n
  else:
    answers, flags = _gold_answers(gold, others, n, rng)
  if cfg.confidences == "random":
    conf = _random_confidences(n, prompts.is_multi(mode), rng)
  else:
    conf = [0.7 if g else 0.1 for g in flags]
  return prompts.format_completion(
      mode, answers, conf if prompts.has_confidence(mode) else None,
      think=None, analysis=prompts.DEFAULT_ANALYSIS,
  )  # fmt: skip


def sft_batch(
  batch, tokenizer, mode: str, k: int, max_len: int, seed: int, cfg=None
):
  """PromptBatch → (tokens [P, T+L], mask, positions, target mask [P, L])."""
  rng = np.random.default_rng(seed)
  pool = [e[0] for g in batch.gold for e in g]
  eos = tokenizer.eos_token_id
  metas = batch.metas or [{}] * len(batch.gold)
  rows = []
  for gold, meta in zip(batch.gold, metas, strict=True):
    others = list(pool)
    rng.shuffle(others)
    text = target_text(gold, others, mode, k, rng, cfg, meta)
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
  """One step of mean next-token cross-entropy on the target tokens.

  ``opt_state`` is of the trainable parameters (``lora.partition``): under
  LoRA the warm-up, like RL, trains the adapters alone.
  """
  start = tokens.shape[1] - tmask.shape[1] - 1
  trainable, frozen = lora.partition(params)

  def objective(train_params):
    m = nnx.merge(graphdef, lora.combine(train_params, frozen))
    logp = loss.token_logprobs(m, tokens, positions, mask, chunk=chunk,
                               start=start)  # fmt: skip
    return -jnp.sum(logp * tmask) / jnp.maximum(jnp.sum(tmask), 1)

  value, grads = jax.value_and_grad(objective)(trainable)
  updates, opt_state = tx.update(grads, opt_state, trainable)
  trainable = optax.apply_updates(trainable, updates)
  return lora.combine(trainable, frozen), opt_state, value


def sft_optimizer(cfg: WarmupConfig):
  return optax.chain(update_lib.clip_by_global_norm(1.0), optax.adamw(cfg.lr))


def run(run_cfg, graphdef, params, source, tok, mesh, *, log=None,
        progress: bool = True):  # fmt: skip
  """The warm-up as a training run does it: ``warmup.steps`` supervised
  steps on the training questions (``source``), batches from the run's
  prompt pipeline (its own seed), under the mesh's sharding rules like the
  RL update. Returns the parameters; ``log(metrics)`` after each step."""
  wc = run_cfg.warmup
  pcfg = run_cfg.pipeline(run_cfg.seed + 7, batch_size=wc.batch_prompts)
  it = data.PromptIterator(source, tok, pcfg)
  tx = sft_optimizer(wc)
  opt_state = jax.jit(tx.init)(lora.partition(params)[0])
  for i in tqdm.trange(wc.steps, desc="warm-up", disable=not progress):
    b = sft_batch(
      next(it),
      tok,
      run_cfg.reward.mode,
      run_cfg.reward.num_answers,
      wc.max_target_len,
      seed=run_cfg.seed + i,
      cfg=wc,
    )
    b = update_lib.place_batch(b, mesh)
    hostmem.release()
    with sharding.activate(mesh, sharding.TRAIN_RULES):
      params, opt_state, value = sft_step(
        graphdef, params, opt_state, *b, tx=tx,
        chunk=run_cfg.rl.logprob_chunk,
      )  # fmt: skip
    if log is not None:
      log({"warmup/loss": value, "warmup/step": i + 1})
  return params
