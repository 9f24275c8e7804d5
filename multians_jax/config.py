"""The run configuration: one tree of frozen dataclasses, one set of defaults.

``RunConfig``'s sections mirror the experiment ``ConfigDict`` one to one
(``mesh model data sampler reward warmup rl loss optim ckpt eval log
export``, plus ``seed`` and ``steps``), and their field defaults are *the*
defaults: ``configs/base.py`` writes the same values with a comment per
field, and a test holds the two equal
(``RunConfig.from_dict(base.get_config().to_dict()) == RunConfig()``).
``from_dict`` is generic: every key of every section is checked against
the section's fields (an unknown one is an error naming it) and against
its type. The settings other modules take are derived here once
(``sampling``, ``loss_config``, ``optim_config``, ``eval_config``,
``update_config``, ``pipeline``, ``sampling_for``).

The derived settings are the types of ``settings.py``, a leaf: importing
this module loads no model, sampler or loss code. The reward and warm-up
sections are ``settings.RewardConfig`` and ``settings.WarmupConfig``
themselves: evaluation, sampling and training all read the reward from
here, so they score alike.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from absl import logging

from multians_jax import settings
from multians_jax.model import config as model_config


def _check(ok: bool, msg: str) -> None:
  if not ok:
    raise ValueError(f"config: {msg}")


def _choice(name: str, value, choices) -> None:
  _check(value in choices, f"{name} must be one of {tuple(choices)}: {value!r}")


@dataclasses.dataclass(frozen=True)
class MeshSection:
  data: int = 1  # data-parallel replicas
  fsdp: int = -1  # parameter sharding; -1 = the remaining devices
  tensor: int = 1  # tensor parallelism over heads / MLP / vocab

  def __post_init__(self):
    for k in ("data", "tensor"):
      _check(getattr(self, k) >= 1, f"mesh.{k} must be >= 1")
    _check(self.fsdp >= 1 or self.fsdp == -1, "mesh.fsdp must be >= 1 or -1")

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.data, self.fsdp, self.tensor)


@dataclasses.dataclass(frozen=True)
class ModelSource:
  path: str = "smollm2"
  arch_name: str = "smollm2_135m"  # model.ARCHS entry: tools/memory.py sizes
  tokenizer: str = ""  # tokenizer source with path='random'
  arch: tuple = ()  # ModelConfig overrides for path='random' (sorted items)
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: str = "none"
  attention: str = "xla"  # xla | cudnn | splash (attention.py)
  lora_rank: int = 0  # > 0: train rank-r adapters alone (lora.py)
  lora_alpha: float = 16.0
  lora_targets: str = "all"  # comma-separated projections, or all

  def __post_init__(self):
    lora_in_arch = sorted(k for k, _ in self.arch if k.startswith("lora_"))
    _check(
      not lora_in_arch,
      f"model.arch must not set {lora_in_arch}: use model.lora_rank, "
      "model.lora_alpha and model.lora_targets",
    )
    _choice("model.param_dtype", self.param_dtype, model_config.DTYPES)
    _choice("model.dtype", self.dtype, model_config.DTYPES)
    _choice("model.attention", self.attention, model_config.IMPLS)
    try:  # before any loading: the checks ModelConfig makes
      model_config.check_lora(
        self.lora_rank, self.lora_alpha, self.lora_targets
      )
    except ValueError as e:
      raise ValueError(f"config: {e}") from None

  @property
  def overrides(self) -> dict:
    """The ``ModelConfig`` fields this config sets on whatever it loads."""
    return dict(
      param_dtype=self.param_dtype,
      dtype=self.dtype,
      remat=self.remat,
      attention=self.attention,
    )


@dataclasses.dataclass(frozen=True)
class DataConfig:
  name: str = "countries"
  data_dir: str = ""
  jsonl: str = ""
  family: str = "qa"
  train_split: str = "train"
  eval_split: str = "test"
  prompts_per_step: int = 24
  max_prompt_len: int = 512
  min_bucket: int = 64

  def __post_init__(self):
    _check(self.prompts_per_step >= 1, "data.prompts_per_step must be >= 1")
    _check(self.min_bucket >= 1, "data.min_bucket must be >= 1")
    _check(
      self.max_prompt_len >= self.min_bucket,
      "data.max_prompt_len must be >= data.min_bucket",
    )


@dataclasses.dataclass(frozen=True)
class SamplerSection:
  max_new_tokens: int = 1536
  temperature: float = 0.7
  top_p: float = 1.0
  top_k: int = 0
  cache_dtype: str = "float32"
  slots: int = 0  # rows decoded at once, refilled as rows stop (0 = all)


@dataclasses.dataclass(frozen=True)
class RLConfig:
  num_generations: int = 32
  advantage: str = "drgrpo"
  num_iterations: int = 1
  micro_batches: int = 1
  micro_batch_tokens: int = 0  # > 0: token-budget micro-batches by length
  pack_completions: bool = False  # a group's completions in one row
  sample_chunk: int = 0  # prompts per sampler call (0 = all)
  share_prompt: bool = True  # update step: each prompt once per group
  credit: str = "sequence"  # sequence | answer | answer_to_go (docs/CREDIT.md)
  pass_k: int = 0  # k of rl.advantage='passk' (2 <= k <= num_generations)
  credit_baseline: str = "slot"  # slot | pooled | answer (docs/CREDIT.md)
  conf_entropy_coef: float = 0.0  # β_C: entropy bonus on confidence spans
  conf_entropy_decay_steps: int = 0  # > 0: β_C → 0 linearly over these
  conf_adv_scale: float = 1.0  # λ: confidence spans' advantages x λ
  dynamic_sampling: bool = False  # drop groups with a flat binary outcome
  dynamic_max_rounds: int = 3  # extra sampling rounds per step at most
  logprob_chunk: int = 128
  max_nonfinite: int = 5
  max_unparsed_steps: int = 50  # 0 = never stop

  def __post_init__(self):
    _check(self.num_generations >= 1, "rl.num_generations must be >= 1")
    _check(self.max_unparsed_steps >= 0, "rl.max_unparsed_steps must be >= 0")
    _check(self.num_iterations >= 1, "rl.num_iterations must be >= 1")
    _check(self.micro_batches >= 1, "rl.micro_batches must be >= 1")
    _check(self.micro_batch_tokens >= 0, "rl.micro_batch_tokens must be >= 0")
    _check(
      not (self.micro_batch_tokens and self.micro_batches > 1),
      "rl.micro_batches and rl.micro_batch_tokens are two ways to split the "
      "update's batch: set rl.micro_batches=1 to use rl.micro_batch_tokens",
    )
    _check(
      not (self.pack_completions and self.micro_batches > 1),
      "rl.pack_completions plans its own micro-batches (by "
      "rl.micro_batch_tokens): set rl.micro_batches=1",
    )
    _check(
      self.advantage != "passk" or 2 <= self.pass_k <= self.num_generations,
      "rl.advantage='passk' optimises pass@k: set rl.pass_k in "
      f"[2, rl.num_generations={self.num_generations}], got {self.pass_k}",
    )
    _check(self.dynamic_max_rounds >= 0, "rl.dynamic_max_rounds must be >= 0")
    _check(
      self.conf_entropy_coef >= 0 and self.conf_entropy_decay_steps >= 0,
      "rl.conf_entropy_coef and rl.conf_entropy_decay_steps must be >= 0: "
      f"{self.conf_entropy_coef}, {self.conf_entropy_decay_steps}",
    )
    _check(
      self.conf_adv_scale > 0
      and (self.conf_adv_scale == 1.0 or self.credit == "decoupled"),
      "rl.conf_adv_scale must be > 0 and scales the confidence spans' own "
      "advantages, which only rl.credit='decoupled' gives: "
      f"{self.conf_adv_scale} with rl.credit={self.credit!r}",
    )
    _check(
      not self.conf_entropy_coef or self.credit != "sequence",
      "rl.conf_entropy_coef is a bonus on the confidence spans' tokens: it "
      "needs per-token advantages (rl.credit 'answer', 'answer_to_go' or "
      "'decoupled'), not rl.credit='sequence'",
    )
    try:
      settings.check_credit(self.advantage, self.credit, self.credit_baseline)
    except ValueError as e:
      raise ValueError(f"config: {e}") from None


@dataclasses.dataclass(frozen=True)
class LossSection:
  """The clipped policy-gradient loss (``settings.LossConfig``, which
  checks the values and their combinations)."""

  kind: str = "ppo"  # ppo | gspo | cispo
  clip_eps_low: float = 0.2
  clip_eps_high: float = 0.2
  gspo_clip_low: float = 3e-4
  gspo_clip_high: float = 4e-4
  agg: str = "token_mean"  # settings.LOSS_AGGS
  kl_beta: float = 0.0
  mask_truncated: bool = False
  entropy_coef: float = 0.0  # β_H: entropy bonus −β_H·H per token
  entropy_decay_steps: int = 0  # > 0: β_H → 0 linearly over these steps


@dataclasses.dataclass(frozen=True)
class OptimSection:
  lr: float = 1e-6
  schedule: str = "constant"
  warmup_frac: float = 0.05
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  grad_clip: float = 1.0

  def __post_init__(self):
    _check(0 <= self.warmup_frac <= 1, "optim.warmup_frac must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class CkptSection:
  every_steps: int = 50
  keep: int = 3
  compress: bool = True

  def __post_init__(self):
    _check(self.every_steps >= 1, "ckpt.every_steps must be >= 1")
    _check(self.keep >= 1, "ckpt.keep must be >= 1")


@dataclasses.dataclass(frozen=True)
class EvalSection:
  every_steps: int = 100  # 0 = only before and after training
  num_prompts: int = 64
  num_generations: int = 4
  temperature: float = 0.7
  before_after: bool = True

  def __post_init__(self):
    _check(self.every_steps >= 0, "eval.every_steps must be >= 0")


@dataclasses.dataclass(frozen=True)
class LogSection:
  every_steps: int = 1
  tensorboard: bool = True
  wandb_project: str = ""
  wandb_entity: str = ""
  wandb_mode: str = "online"

  def __post_init__(self):
    _check(self.every_steps >= 1, "log.every_steps must be >= 1")
    modes = ("online", "offline", "disabled")
    _choice("log.wandb_mode", self.wandb_mode, modes)


@dataclasses.dataclass(frozen=True)
class ExportSection:
  hf_dir: str = ""  # '' = no export; relative paths are under WORKDIR
  report: bool = False


SECTIONS = {
  "mesh": MeshSection,
  "model": ModelSource,
  "data": DataConfig,
  "sampler": SamplerSection,
  "reward": settings.RewardConfig,
  "warmup": settings.WarmupConfig,
  "rl": RLConfig,
  "loss": LossSection,
  "optim": OptimSection,
  "ckpt": CkptSection,
  "eval": EvalSection,
  "log": LogSection,
  "export": ExportSection,
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
  seed: int = 43
  steps: int = 500
  mesh: MeshSection = MeshSection()
  model: ModelSource = ModelSource()
  data: DataConfig = DataConfig()
  sampler: SamplerSection = SamplerSection()
  reward: settings.RewardConfig = settings.RewardConfig()
  warmup: settings.WarmupConfig = settings.WarmupConfig()
  rl: RLConfig = RLConfig()
  loss: LossSection = LossSection()
  optim: OptimSection = OptimSection()
  ckpt: CkptSection = CkptSection()
  eval: EvalSection = EvalSection()
  log: LogSection = LogSection()
  export: ExportSection = ExportSection()

  def __post_init__(self):
    _check(
      self.steps >= 0, "steps must be >= 0 (0: warm-up and evaluation only)"
    )
    _check(
      self.rl.credit == "sequence" or self.reward.correctness != "any",
      f"rl.credit={self.rl.credit!r} needs an additive correctness term "
      "(reward.correctness='count' or 'count_over_k'); "
      "reward.correctness='any' gives one correct slot the whole reward",
    )
    _check(
      not self.rl.conf_entropy_coef or "rlcr" in self.reward.mode,
      "rl.conf_entropy_coef acts on confidence spans: reward.mode "
      f"{self.reward.mode!r} has none (use rlcr or multi_rlcr)",
    )
    _check(
      not (self.rl.pack_completions and self.model.attention == "splash"),
      "rl.pack_completions needs model.attention 'xla' or 'cudnn': splash's "
      "shared-prompt mask has no per-completion form",
    )
    p, g = self.data.prompts_per_step, self.rl.num_generations
    _check(
      (p * g) % self.rl.micro_batches == 0,
      "rl.micro_batches must divide prompts_per_step * num_generations",
    )
    # the derived configs' own checks, at load time
    for derived in ("sampling", "loss_config", "optim_config", "eval_config"):
      try:
        getattr(self, derived)
      except ValueError as e:
        msg = str(e)
        raise ValueError(msg if "config" in msg else f"config: {msg}") from None

  # -- the settings other modules take, derived in one place ---------------

  @property
  def sampling(self) -> settings.SamplingConfig:
    s = self.sampler
    return settings.SamplingConfig(
      max_new_tokens=s.max_new_tokens,
      temperature=s.temperature,
      top_p=s.top_p,
      top_k=s.top_k,
      cache_dtype=s.cache_dtype,
      slots=s.slots,
    )

  @property
  def loss_config(self) -> settings.LossConfig:
    lo = self.loss
    return settings.LossConfig(
      kind=lo.kind,
      clip_eps_low=lo.clip_eps_low,
      clip_eps_high=lo.clip_eps_high,
      gspo_clip_low=lo.gspo_clip_low,
      gspo_clip_high=lo.gspo_clip_high,
      loss_agg=lo.agg,
      kl_beta=lo.kl_beta,
      mask_truncated=lo.mask_truncated,
      entropy_coef=lo.entropy_coef,
      entropy_decay_steps=lo.entropy_decay_steps,
      max_len_norm=self.sampler.max_new_tokens,  # Dr.GRPO's constant
    )

  @property
  def optim_config(self) -> settings.OptimConfig:
    o = self.optim
    return settings.OptimConfig(
      lr=o.lr,
      schedule=o.schedule,
      warmup_steps=int(round(o.warmup_frac * self.steps)),
      total_steps=max(self.steps, 1),
      b1=o.b1,
      b2=o.b2,
      weight_decay=o.weight_decay,
      grad_clip=o.grad_clip,
    )

  @property
  def eval_config(self) -> settings.EvalConfig:
    """Evaluation samples as training does (the sampler section: token
    limit, top-p, top-k, cache dtype, slots) with the same prompt
    bucketing, at its own temperature, prompts and generations."""
    e = self.eval
    return settings.EvalConfig(
      num_prompts=e.num_prompts,
      num_generations=e.num_generations,
      max_prompt_len=self.data.max_prompt_len,
      min_bucket=self.data.min_bucket,
      sampling=dataclasses.replace(self.sampling, temperature=e.temperature),
    )

  def sampling_for(self, model_cfg, tokenizer=None) -> settings.SamplingConfig:
    """The training sampler's settings for a model (``stop_and_pad``);
    prompts arrive bucketed by the data pipeline, so no re-bucketing."""
    stop_ids, pad_id = stop_and_pad(model_cfg, tokenizer)
    return dataclasses.replace(
      self.sampling, stop_ids=stop_ids, pad_id=pad_id, min_prompt_bucket=0
    )

  @property
  def update_config(self) -> settings.UpdateConfig:
    """The update step's static settings: the loss, micro-batches, the
    sampler's temperature and support (log-probs of the distribution that
    sampled), prompt sharing within groups."""
    rl = self.rl
    return settings.UpdateConfig(
      loss=self.loss_config,
      micro_batches=rl.micro_batches,
      micro_batch_tokens=rl.micro_batch_tokens,
      pack=rl.pack_completions,
      temperature=max(self.sampler.temperature, 1e-6),
      logprob_chunk=rl.logprob_chunk,
      group_size=rl.num_generations if rl.share_prompt else 1,
      support=self.sampling.support,
    )

  def pipeline(self, seed: int, batch_size: int | None = None):
    """The prompt pipeline's settings: global batches (``batch_size``,
    default ``data.prompts_per_step``), the same stream on every
    process."""
    return settings.PipelineConfig(
      batch_size=batch_size or self.data.prompts_per_step,
      mode=self.reward.mode,
      num_answers=self.reward.num_answers,
      max_prompt_len=self.data.max_prompt_len,
      min_bucket=self.data.min_bucket,
      seed=seed,
    )

  @property
  def eval_seed(self) -> int:
    """The evaluation's PRNG seed (training's is ``seed``)."""
    return self.seed + 1

  # -- dicts ---------------------------------------------------------------

  @classmethod
  def from_dict(cls, c: dict) -> RunConfig:
    """Validates a config dict (``ConfigDict.to_dict()``): every key known,
    every value of its field's type; errors name the key."""
    c = dict(c)
    unknown = sorted(set(c) - set(SECTIONS) - {"seed", "steps"})
    _check(not unknown, f"unknown key(s): {unknown}")
    kw: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for k in ("seed", "steps"):
      if k in c:
        kw[k] = _coerce(k, hints[k], c[k])
    for name, section in SECTIONS.items():
      if name in c:
        kw[name] = _section(name, section, c[name])
    run = cls(**kw)
    _warn_format_penalty(run.reward)
    return run

  def to_dict(self) -> dict:
    """The ConfigDict-shaped dict (``from_dict(run.to_dict()) == run``)."""
    out = dataclasses.asdict(self)
    out["model"]["arch"] = dict(self.model.arch)
    return out


def stop_and_pad(model_cfg, tokenizer=None) -> tuple[tuple[int, ...], int]:
  """The sampler's stop ids and pad id for a model, the one place they are
  decided: the model's EOS ids (the tokenizer's EOS when the model names
  none) and its pad id (0 when it has none)."""
  stop = tuple(int(i) for i in model_cfg.eos_ids)
  eos = getattr(tokenizer, "eos_token_id", None)
  if not stop and eos is not None:
    stop = (int(eos),)
  pad = model_cfg.pad_token_id
  return stop, int(pad) if pad is not None else 0


def tool_config_flag(purpose: str):
  """A tool's ``--config`` flag, the one surface of its settings: an
  experiment config file (``configs/demo.py``, ``configs/lab.py:rlvr``),
  by default ``configs/base.py`` (the defaults), with ``--config.x=y``
  overrides. ``tool_run_config`` reads it."""
  import importlib.util

  from ml_collections import config_flags

  base = importlib.util.find_spec("configs.base")
  default = base.origin if base is not None else None
  return config_flags.DEFINE_config_file("config", default, purpose)


def tool_run_config(flag) -> RunConfig:
  """The validated ``RunConfig`` of a tool's ``tool_config_flag``."""
  if flag.value is None:
    raise ValueError("config: give --config=FILE (configs/ is not installed)")
  return RunConfig.from_dict(flag.value.to_dict())


def _section(name: str, cls, d) -> Any:
  if not isinstance(d, dict):
    raise ValueError(f"config: {name} must be a section, got {d!r}")
  names = {f.name for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(d) - names)
  _check(
    not unknown,
    f"unknown key(s) in {name}: {', '.join(f'{name}.{k}' for k in unknown)}",
  )
  hints = typing.get_type_hints(cls)
  kw = {k: _coerce(f"{name}.{k}", hints[k], v) for k, v in d.items()}
  try:
    return cls(**kw)
  except ValueError as e:
    msg = str(e)
    if not msg.startswith("config:"):
      msg = f"config: {name}: {msg}"
    raise ValueError(msg) from None


def _coerce(key: str, want, value):
  """``value`` as the field's type: ints where ints go (not bools), floats
  from ints, tuples from lists (and a dict's sorted items)."""
  origin = typing.get_origin(want) or want
  if origin is bool:
    _check(isinstance(value, bool), f"{key} must be True or False: {value!r}")
  elif origin is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    _check(ok, f"{key} must be an integer: {value!r}")
  elif origin is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)
    _check(ok, f"{key} must be a finite number: {value!r}")
    value = float(value)
  elif origin is str:
    _check(isinstance(value, str), f"{key} must be a string: {value!r}")
  elif origin is tuple:
    if isinstance(value, dict):
      value = tuple(sorted(value.items()))
    _check(isinstance(value, (list, tuple)), f"{key} must be a list: {value!r}")
    value = tuple(value)
  return value


def _warn_format_penalty(rw: settings.RewardConfig) -> None:
  """Under the paper preset a valid RLCR completion can score down to -1
  (r_acc - B with r_acc = 0 and B = 1); a format failure scoring above that
  rewards breaking the format (seen in the lab: STUDY.md)."""
  floor = -1.0
  if (
    rw.preset == "paper"
    and rw.mode.endswith("rlcr")
    and float(rw.format_penalty) > floor
  ):
    logging.warning(
      "reward.format_penalty=%s is above %s, the lowest reward of a valid "
      "%s completion under preset=paper: a policy can gain by breaking the "
      "format (set --config.reward.format_penalty=%s)",
      rw.format_penalty,
      floor,
      rw.mode,
      floor,
    )
