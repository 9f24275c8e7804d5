"""The typed settings each part of the library takes, in one leaf module.

``config.RunConfig`` derives every one of them from the run's config tree
(its ``sampling``, ``loss_config``, ``update_config``, ``optim_config``,
``eval_config`` and ``pipeline``; ``reward`` and ``warmup`` are sections of
the tree as they are). The modules that use them re-export them
(``sampler.SamplingConfig`` is ``settings.SamplingConfig``). This module
imports no model, loss or sampler code, so validating a config loads none
of it (``tests/test_structure.py`` holds the count).

The tables of choices live here too, each the one list its setting is
checked against.
"""

from __future__ import annotations

import dataclasses
import math

from multians_jax.data import prompts
from multians_jax.model.config import DTYPES
from multians_jax.model.support import FULL, Support
from multians_jax.rl import matchers

KINDS = ("drgrpo", "grpo", "rloo")  # kinds that read one reward per row
ADVANTAGES = (*KINDS, "gdpo", "passk")  # every rl.advantage
BASELINES = ("slot", "pooled")  # advantage.slot_advantages' baselines
# rl.credit_baseline; 'answer': decoupled credit's confidence spans only
CREDIT_BASELINES = (*BASELINES, "answer")
# rl.credit (docs/CREDIT.md)
CREDITS = ("sequence", "answer", "answer_to_go", "decoupled")


def check_credit(kind: str, credit: str, baseline: str) -> None:
  """``rl.advantage``, ``rl.credit`` and ``rl.credit_baseline``, and the
  rules between them: the one place they are checked (the run config at
  load time, ``credit.rollout_advantages`` when called directly)."""
  for key, value, choices in (
    ("rl.advantage", kind, ADVANTAGES),
    ("rl.credit", credit, CREDITS),
    ("rl.credit_baseline", baseline, CREDIT_BASELINES),
  ):
    if value not in choices:
      raise ValueError(f"{key} must be one of {choices}: {value!r}")
  if kind in ("gdpo", "passk") and credit != "sequence":
    what = {
      "gdpo": "normalises whole-sequence reward components",
      "passk": "transforms each completion's whole reward (PKPO)",
    }[kind]
    raise ValueError(
      f"rl.advantage={kind!r} {what}; use it with rl.credit='sequence'"
    )
  if baseline == "answer" and (
    credit != "decoupled" or kind not in ("drgrpo", "rloo")
  ):
    raise ValueError(
      "rl.credit_baseline='answer' baselines each confidence by the other "
      "completions of its group that state the same answer: it needs "
      "rl.credit='decoupled' and rl.advantage 'drgrpo' or 'rloo' (a mean "
      f"baseline, no std), got {credit!r} / {kind!r}"
    )
  if credit == "answer_to_go" and baseline != "slot":
    raise ValueError(
      "rl.credit='answer_to_go' sums each slot's parts with the later "
      "slots'; its baseline is per slot: rl.credit_baseline='slot'"
    )


LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
LOSSES = ("ppo", "gspo", "cispo")
SCHEDULES = ("constant", "linear", "cosine")


# --------------------------------------------------------------------------
# Sampling


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static sampling settings (hashable: part of the compilation key)."""

  max_new_tokens: int = 128
  temperature: float = 1.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off
  stop_ids: tuple[int, ...] = ()  # EOS and any extra stop tokens
  pad_id: int = 0  # written after a row stops
  cache_dtype: str = "float32"  # bfloat16 on accelerators
  slots: int = 0  # rows decoded at once, refilled as rows stop (0 = all)
  min_prompt_bucket: int = 16  # 0 = keep the caller's (pre-bucketed) length

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError("sampler.max_new_tokens must be >= 1")
    if self.temperature < 0:
      raise ValueError("sampler.temperature must be >= 0")
    if self.top_k < 0:
      raise ValueError("sampler.top_k must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError("sampler.top_p must be in (0, 1]")
    if self.slots < 0:
      raise ValueError("sampler.slots must be >= 0 (0 = one per row)")
    if self.cache_dtype not in DTYPES:
      raise ValueError(f"sampler.cache_dtype must be in {tuple(DTYPES)}")

  @property
  def support(self) -> Support:
    """The top-k / top-p support drawn from (and scored on by the update)."""
    return Support(self.top_k, self.top_p)


# --------------------------------------------------------------------------
# The update: loss, optimiser, step


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Settings of the clipped policy-gradient loss (METHOD §5; the run
  config's ``loss`` section).

  Attributes:
    clip_eps_low: ε_low, the ratio is clipped below at 1 − ε_low; in [0, 1).
    clip_eps_high: ε_high, clipped above at 1 + ε_high; ≥ 0.
    loss_agg: one of ``LOSS_AGGS`` (module docstring).
    max_len_norm: Dr.GRPO's constant divisor (the maximum completion
      length); required by ``seq_mean_token_sum_norm``.
    kl_beta: β of the k3 KL penalty against a frozen reference; 0 = none.
    mask_truncated: drop completions cut by the length limit from the loss.
    kind: ``ppo`` | ``gspo`` | ``cispo`` (module docstring).
    gspo_clip_low / gspo_clip_high: GSPO's clip range of the sequence
      ratio (its paper's 3e-4 / 4e-4).
    entropy_coef: β_H ≥ 0, an entropy bonus: −β_H · H_t is added to every
      counted token's loss (aggregated as the loss is), H_t the entropy of
      the sampler's distribution at token t.
    entropy_decay_steps: > 0: β_H falls linearly to 0 over this many
      optimizer steps (then the objective is the reward's alone); 0 = kept.
  """

  clip_eps_low: float = 0.2
  clip_eps_high: float = 0.2
  loss_agg: str = "token_mean"
  max_len_norm: int | None = None
  kl_beta: float = 0.0
  mask_truncated: bool = False
  kind: str = "ppo"
  gspo_clip_low: float = 3e-4
  gspo_clip_high: float = 4e-4
  entropy_coef: float = 0.0
  entropy_decay_steps: int = 0

  def __post_init__(self):
    if self.entropy_coef < 0 or self.entropy_decay_steps < 0:
      raise ValueError(
        "loss.entropy_coef and loss.entropy_decay_steps must be >= 0: "
        f"{self.entropy_coef}, {self.entropy_decay_steps}"
      )
    if self.kind not in LOSSES:
      raise ValueError(f"loss.kind must be one of {LOSSES}: {self.kind!r}")
    if self.kind == "gspo" and self.loss_agg != "seq_mean_token_mean":
      raise ValueError(
        "loss.kind='gspo' optimises a mean over sequences of a sequence-level "
        "ratio: it needs loss.agg='seq_mean_token_mean', got "
        f"{self.loss_agg!r}"
      )
    for name in ("gspo_clip_low", "gspo_clip_high"):
      v = getattr(self, name)
      if not (math.isfinite(v) and 0 <= v < 1):
        raise ValueError(f"loss.{name} must be in [0, 1): {v}")
    if not 0 <= self.clip_eps_low < 1:
      raise ValueError(
        f"loss.clip_eps_low must be in [0, 1): {self.clip_eps_low}"
      )
    if not self.clip_eps_high >= 0:
      raise ValueError(f"loss.clip_eps_high must be >= 0: {self.clip_eps_high}")
    if self.loss_agg not in LOSS_AGGS:
      raise ValueError(
        f"loss.agg must be one of {LOSS_AGGS}: {self.loss_agg!r}"
      )
    sum_norm = self.loss_agg == "seq_mean_token_sum_norm"
    if sum_norm and not (self.max_len_norm and self.max_len_norm > 0):
      raise ValueError(
        "max_len_norm must be a positive length (the maximum completion "
        "length) with loss.agg='seq_mean_token_sum_norm': "
        f"{self.max_len_norm}"
      )
    if not (math.isfinite(self.kl_beta) and self.kl_beta >= 0):
      raise ValueError(f"loss.kl_beta must be finite and >= 0: {self.kl_beta}")
    if not isinstance(self.mask_truncated, bool):
      raise ValueError(
        f"loss.mask_truncated must be a bool: {self.mask_truncated!r}"
      )


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with warmup, a decay schedule and global-norm clipping."""

  lr: float = 1e-6
  schedule: str = "constant"  # constant | linear | cosine (after warmup)
  warmup_steps: int = 0
  total_steps: int = 500  # for the linear / cosine decay
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0  # not applied to norms (1-D params)
  grad_clip: float = 1.0  # global norm; 0 = off

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"optim.schedule must be one of {SCHEDULES}")
    if self.lr <= 0:
      raise ValueError(f"optim.lr must be > 0: {self.lr}")
    if self.warmup_steps < 0 or self.total_steps < 1:
      raise ValueError("optim.warmup_steps >= 0 and optim.total_steps >= 1")
    if self.grad_clip < 0:
      raise ValueError("optim.grad_clip must be >= 0")


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
  """Static settings of the update step."""

  loss: LossConfig = LossConfig()
  micro_batches: int = 1  # M: B must be a multiple of it
  # > 0: token-budget micro-batches instead (``rl/microbatch.py``): groups
  # sorted by length, at most this many decoder positions each.
  micro_batch_tokens: int = 0
  # True: a group's completions packed one after another in one row
  # (``rl/packing.py``), micro-batches planned by ``microbatch.pack``.
  pack: bool = False
  temperature: float = 1.0  # the sampler's (log-probs of the same dist)
  logprob_chunk: int = 128  # positions whose logits exist at once
  # The sampler's top-k / top-p truncation: log-probs are the sampler's,
  # renormalised over the same support (on-policy ratios).
  support: Support = FULL
  # G: rows come in prompt-major groups of G identical prompts (as
  # ``sampler.sample`` returns them). With G > 1 every prompt runs through
  # the decoder once per group (or per part of a group in a micro-batch),
  # not once per row (``loss.shared_prompt_logprobs``); 1 = no sharing.
  group_size: int = 1

  def __post_init__(self):
    if self.micro_batches < 1:
      raise ValueError(f"micro_batches must be >= 1: {self.micro_batches}")
    if self.group_size < 1:
      raise ValueError(f"group_size must be >= 1: {self.group_size}")
    if self.micro_batch_tokens < 0:
      raise ValueError(
        f"micro_batch_tokens must be >= 0: {self.micro_batch_tokens}"
      )
    if (self.micro_batch_tokens or self.pack) and self.micro_batches > 1:
      raise ValueError(
        "micro_batches and micro_batch_tokens are two ways to split the "
        "batch: set micro_batches=1 with micro_batch_tokens > 0 or pack"
      )


# --------------------------------------------------------------------------
# Reward

CORRECTNESS = ("count", "count_over_k", "any")
PRESETS = ("paper", "reference")


# The paper's reward (arXiv 2603.24844): r_acc = D, R = r_acc - B, Σq <= 1
# gate. RewardConfig's defaults are the training defaults (configs/base.py:
# the reference code's ``any`` / ``reference``, no Σq gate);
# ``RewardConfig(**PAPER)`` is the paper's.
PAPER = dict(correctness="count", preset="paper", confidence_sum_le_one=True)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """Reward settings (METHOD §3); the defaults are training's (``PAPER``).

  Attributes:
    mode: output format, one of ``prompts.MODES``.
    num_answers: K answers per generation in the multi modes.
    correctness: r_acc = D (``count``, paper), D/K (``count_over_k``) or
      1[D >= 1] (``any``, the reference code's default).
    preset: ``paper`` (R = r_acc - B, format failure gives
      ``format_penalty``) or ``reference`` (R = w_f f + w_a r_acc +
      w_b (1 - B)).
    require_distinct: in ``multi_rlcr``, duplicate answers (after
      normalisation) zero r_acc and disable the Brier term. Has no effect on
      ``multi_rlvr``, where duplicates simply add nothing to D.
    confidence_sum_le_one: disable the Brier term when Σq > 1. Only right
      for single-truth tasks: when answers are not mutually exclusive the
      true marginals p_i can sum above one, and this gate then breaks the
      properness of the Multi-RLCR reward (honest q = p is punished).
    require_think: the ``<think>`` block must come first.
    accept_percent: read ``70%`` as 0.7.
    format_penalty: total reward of a format failure in the ``paper``
      preset.
    weights: (w_f, w_a, w_b) of the ``reference`` preset.
    matcher: a name in ``matchers.MATCHERS`` (``exact``, ``numeric``,
      ``code``) or a ``matchers.Matcher`` object (your own).
  """

  mode: str = "multi_rlcr"
  num_answers: int = 3
  correctness: str = "any"
  preset: str = "reference"
  require_distinct: bool = True
  confidence_sum_le_one: bool = False
  require_think: bool = True
  accept_percent: bool = False
  format_penalty: float = 0.0
  weights: tuple = (0.5, 0.5, 0.5)
  matcher: str | matchers.Matcher = "exact"

  def __post_init__(self):
    _check_choice("mode", self.mode, prompts.MODES)
    _check_choice("correctness", self.correctness, CORRECTNESS)
    _check_choice("preset", self.preset, PRESETS)
    if not isinstance(self.num_answers, int) or self.num_answers < 1:
      raise ValueError(f"num_answers must be an int >= 1: {self.num_answers}")
    for name in _BOOL_FIELDS:
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be a bool: {getattr(self, name)!r}")
    if not math.isfinite(float(self.format_penalty)):
      raise ValueError(f"format_penalty must be finite: {self.format_penalty}")
    w = tuple(float(x) for x in self.weights)
    if len(w) != 3 or not all(math.isfinite(x) for x in w):
      raise ValueError(f"weights must be 3 finite floats: {self.weights}")
    object.__setattr__(self, "weights", w)
    matchers.get(self.matcher)  # a known name or a Matcher

  @property
  def slots(self) -> int:
    """A: answer slots per completion (K, or 1 in single-answer modes)."""
    return prompts.slots(self.mode, self.num_answers)

  def kernel_kwargs(self) -> dict:
    """Keyword arguments of ``set_reward_kernel`` for this config."""
    return dict(
      mode=self.mode,
      correctness=self.correctness,
      preset=self.preset,
      require_distinct=self.require_distinct,
      confidence_sum_le_one=self.confidence_sum_le_one,
      format_penalty=float(self.format_penalty),
      weights=self.weights,
    )


_BOOL_FIELDS = (
  "require_distinct",
  "confidence_sum_le_one",
  "require_think",
  "accept_percent",
)


def _check_choice(field: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{field} must be one of {choices}, got {value!r}")


# --------------------------------------------------------------------------
# Data, evaluation, warm-up


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Settings of the prompt pipeline (unpacked from ``config.data``)."""

  batch_size: int  # P, prompts per batch.
  mode: str  # reward mode, selects the system prompt (prompts.MODES).
  num_answers: int  # A, answers asked for per generation.
  max_prompt_len: int  # longer prompts are dropped and counted.
  min_bucket: int = 64  # smallest padded length.
  seed: int = 0  # shuffle seed.
  shuffle: bool = True  # False: records in source order (evaluation).
  num_epochs: int | None = None  # None: repeat forever.

  def __post_init__(self):
    if self.batch_size < 1 or self.max_prompt_len < 1 or self.min_bucket < 1:
      raise ValueError(f"sizes must be positive: {self}")
    prompts.check_mode(self.mode)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  num_prompts: int = 64  # held-out prompts (the first N in source order)
  num_generations: int = 4  # G generations pooled per prompt
  batch_prompts: int = 8  # prompts per sampler call
  max_prompt_len: int = 512
  min_bucket: int = 64
  # How completions are sampled (stop and pad ids come with the model, at
  # ``run``): a run evaluates with its own sampler settings (top-p, top-k,
  # cache dtype, slots, token limit) at ``eval.temperature``
  # (``config.RunConfig.eval_config``).
  sampling: SamplingConfig = SamplingConfig(max_new_tokens=256, temperature=0.7)

  def __post_init__(self):
    if self.num_prompts < 1 or self.num_generations < 1:
      raise ValueError("eval.num_prompts and eval.num_generations must be >= 1")


ANSWERS = ("gold", "distribution")
CONFIDENCES = ("fixed", "random")


@dataclasses.dataclass(frozen=True)
class WarmupConfig:
  steps: int = 0  # 0 = no warm-up
  lr: float = 1e-4  # AdamW learning rate (constant)
  batch_prompts: int = 8  # prompts per warm-up step
  max_target_len: int = 96  # target tokens (longer targets are cut)
  answers: str = "gold"  # gold | distribution (see the module docstring)
  confidences: str = "fixed"  # fixed | random
  flatten: float = 0.5  # τ: exponent of the flattened distribution
  distractor_weight: float = 0.05  # w: weight of a distractor before τ

  def __post_init__(self):
    if self.steps < 0 or self.lr <= 0 or self.max_target_len < 8:
      raise ValueError(f"warmup: invalid settings {self}")
    if self.answers not in ANSWERS:
      raise ValueError(f"warmup.answers must be one of {ANSWERS}")
    if self.confidences not in CONFIDENCES:
      raise ValueError(f"warmup.confidences must be one of {CONFIDENCES}")
    if not 0 < self.flatten <= 1 or self.distractor_weight < 0:
      raise ValueError(
        "warmup.flatten must be in (0, 1] and warmup.distractor_weight >= 0"
      )
