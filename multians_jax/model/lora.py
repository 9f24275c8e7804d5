"""LoRA: low-rank adapters on the decoder's projections, trained alone.

With ``ModelConfig.lora_rank = r > 0`` every target projection W [I, O]
(``model.lora_targets``) gets ``nnx.LoRAParam`` adapters A [I, r] and
B [r, O], and computes ``x·W + (alpha / r)·(x·A)·B`` (``layers.project``).
A starts as PEFT's default, U(±1/√I); B starts at zero, so a fresh adapter
leaves the model's function unchanged. Adapters are float32 whatever
``param_dtype`` is (a bfloat16 base with float32 adapters is the usual way
to fit a large model), and compute in ``dtype`` like the rest.

A model that holds adapters trains only them: ``partition`` splits its
parameters into the trainable adapters and the frozen rest. The update step
differentiates with respect to the adapters alone (no gradient buffer of the
base's size exists), the optimizer holds moments for the adapters alone,
and a checkpoint writes the frozen base once and only the adapters at each
step (``checkpoint.py``). The sampler runs base + adapters unmerged;
``merge`` folds them into the weights for export (``hf.save``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from multians_jax.model import transformer as model_lib


def has_adapters(params: nnx.State) -> bool:
  return bool(jax.tree.leaves(nnx.filter_state(params, nnx.LoRAParam)))


def partition(params: nnx.State) -> tuple[nnx.State, nnx.State | None]:
  """(trainable, frozen): the adapters and the rest when ``params`` holds
  adapters, else (params, None): every parameter is trainable."""
  adapters, rest = nnx.split_state(params, nnx.LoRAParam, ...)
  if not jax.tree.leaves(adapters):
    return params, None
  return adapters, rest


def combine(trainable: nnx.State, frozen: nnx.State | None) -> nnx.State:
  """Inverse of ``partition``."""
  return trainable if frozen is None else nnx.merge_state(trainable, frozen)


def settings(cfg) -> tuple:
  """The LoRA settings of a ``ModelConfig`` or ``loop.ModelSource`` as
  (rank, alpha, targets), () when LoRA is off: what a source, a run and a
  WORKDIR's checkpoints must agree on."""
  if not cfg.lora_rank:
    return ()
  targets = model_lib.lora_targets(cfg.lora_targets)
  return (cfg.lora_rank, float(cfg.lora_alpha), targets)


def _shardings(state: nnx.State, like) -> nnx.State:
  """NamedShardings for an abstract state on the mesh of array ``like``."""
  from multians_jax import sharding

  mesh = like.sharding.mesh
  return model_lib.state_shardings(state, mesh, sharding.TRAIN_RULES)


def add(
  model: model_lib.Transformer,
  rank: int,
  alpha: float,
  targets,
  seed: int = 0,
) -> model_lib.Transformer:
  """``model`` (without adapters) + fresh rank-``rank`` adapters.

  The base arrays are reused as they are; only the adapters are allocated,
  each directly in its training sharding.
  """
  if model.cfg.lora_rank:
    raise ValueError("the model already holds adapters (lora.merge first)")
  cfg = model.cfg.replace(
    lora_rank=rank, lora_alpha=alpha, lora_targets=targets
  )
  graphdef, abs_state = nnx.split(model_lib.abstract_model(cfg))
  abs_adapters, _ = nnx.split_state(abs_state, nnx.LoRAParam, ...)
  base = nnx.state(model, nnx.Param)
  base_specs = model_lib.layer_param_specs(model.cfg)
  specs = model_lib.lora_param_specs(cfg, base_specs)
  shard = _shardings(abs_adapters, jax.tree.leaves(base)[0])
  shard_flat = {p[-1]: s for p, s in nnx.to_flat_state(shard)}
  pdt = jnp.float32  # adapters: float32 master weights (model.Layers)
  values = {}
  for i, (name, (shape, _, init)) in enumerate(sorted(specs.items())):
    full = (cfg.num_layers, *shape)
    if init == "lora_a":
      bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
      key = jax.random.fold_in(jax.random.key(seed), i)
      make = lambda k=key, s=full, b=bound: jax.random.uniform(
        k, s, jnp.float32, -b, b
      ).astype(pdt)
    else:
      make = lambda s=full: jnp.zeros(s, pdt)
    values[name] = jax.jit(make, out_shardings=shard_flat[name])()
  adapters = abs_adapters
  nnx.replace_by_pure_dict(adapters, {"layers": values})
  return nnx.merge(graphdef, nnx.merge_state(adapters, base))


def merged_weight(cfg, w, a, b, dtype=None) -> jax.Array:
  """W + (alpha / r)·A·B in W's shape and dtype, or ``dtype`` (products in
  float32)."""
  r = cfg.lora_rank
  n_layers, n_in = a.shape[0], math.prod(a.shape[1:-1])
  delta = jnp.einsum(
    "lir,lro->lio",
    a.reshape(n_layers, n_in, r).astype(jnp.float32),
    b.reshape(n_layers, r, -1).astype(jnp.float32),
  )
  scale = cfg.lora_alpha / r
  merged = w.astype(jnp.float32) + scale * delta.reshape(w.shape)
  return merged.astype(dtype or w.dtype)


def merge(model: model_lib.Transformer, dtype=None) -> model_lib.Transformer:
  """The model with its adapters folded into the weights (``lora_rank`` 0):
  the same function, in the base architecture (HF export). The merged
  weights are in the base's dtype, or ``dtype`` ("float32": a bfloat16
  base would round away updates below its resolution, ≈ 2⁻⁸ relative)."""
  cfg = model.cfg
  if not cfg.lora_rank:
    return model
  defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
  base_cfg = cfg.replace(
    **{k: defaults[k] for k in ("lora_rank", "lora_alpha", "lora_targets")}
  )
  graphdef, abs_state = nnx.split(model_lib.abstract_model(base_cfg))
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  layers = dict(pure["layers"])
  dt = None if dtype is None else model_lib.DTYPES[dtype]
  for name in cfg.lora_targets:
    a = layers.pop(f"{name}_lora_a")
    b = layers.pop(f"{name}_lora_b")
    w = layers[name]
    place = {"out_shardings": w.sharding} if hasattr(w, "sharding") else {}
    fold = jax.jit(lambda w, a, b: merged_weight(cfg, w, a, b, dt), **place)
    layers[name] = fold(w, a, b)
  pure["layers"] = layers
  nnx.replace_by_pure_dict(abs_state, pure)
  return nnx.merge(graphdef, abs_state)
