"""The policy a run trains and the references it is checked against:
loading it from the configured source (with the LoRA merge/add rules),
the frozen reference of the KL term, and the check that a WORKDIR's
checkpoints were written with the run's adapter settings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from multians_jax import checkpoint, sharding, sources
from multians_jax.config import ModelSource, RunConfig
from multians_jax.model import lora
from multians_jax.model import transformer as model_lib


def load_policy(src: ModelSource, mesh, seed: int, tokenizer=None):
  """(model, tokenizer) from the configured source, in training sharding.

  With ``model.lora_rank`` > 0 the policy is the source + fresh adapters
  (a source that already holds different adapters has them merged first);
  a source with the same adapter shape (a LoRA run's checkpoint) is used
  as it is.
  """
  over = src.overrides
  if src.path == sources.RANDOM:
    if tokenizer is None and not src.tokenizer:
      raise ValueError("config: model.tokenizer is required with path=random")
    tok = tokenizer or sources.load_tokenizer(src.tokenizer)
    cfg = model_lib.ModelConfig(**{**dict(src.arch), **over})
    m = model_lib.init_model(cfg, mesh, sharding.TRAIN_RULES, seed=seed)
  else:
    m, _, tok = sources.load_model(src.path, mesh, sharding.TRAIN_RULES, **over)
    if tok is None:
      raise ValueError(f"model {src.path} has no tokenizer: RL needs one")
  want = lora.settings(src)
  if m.cfg.lora_rank and lora.settings(m.cfg) != want:
    m = lora.merge(m)
  if want and not m.cfg.lora_rank:
    m = lora.add(m, *want, seed=seed)
  return m, tok


def reference(run: RunConfig, mesh, tok, initial):
  """The frozen initial policy (for the KL term) as a function of the
  current parameters. ``initial``: the policy's parameters as loaded from
  the source, before any update. Under LoRA it is the current (frozen)
  base with a copy of the initial adapters, zero B unless the source held
  trained ones (no second copy of the weights; combined fresh each step,
  since the update step donates the policy's arrays); else the source is
  reloaded once."""
  if lora.has_adapters(initial):
    adapters = jax.tree.map(jnp.copy, lora.partition(initial)[0])
    return lambda params: lora.combine(adapters, lora.partition(params)[1])
  ref, _ = load_policy(run.model, mesh, run.seed, tokenizer=tok)
  fixed = nnx.state(ref, nnx.Param)
  return lambda _: fixed


def check_same_adapters(path: str, cfg) -> None:
  """A WORKDIR's checkpoints were written with the run's LoRA settings: a
  resume with other ones would not restore (rank, targets) or would train
  with a scale the saved model config does not record (alpha)."""
  if not checkpoint.is_checkpoint(path):
    return
  have = lora.settings(checkpoint.read_model_config(path))
  want = lora.settings(cfg)
  if have != want:
    show = lambda x: f"LoRA (rank, alpha, targets) = {x}" if x else "no LoRA"
    raise ValueError(
      f"config: the checkpoints in {path} were written with {show(have)}, "
      f"this run asks for {show(want)}; use the same model.lora_* or a new "
      "WORKDIR"
    )
