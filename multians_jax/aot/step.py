"""Ahead-of-time compilation of one RL step for a named TPU topology or
GPU host (the library behind ``tools/aot.py``).

A CPU host with ``libtpu`` and the CUDA plugin installed (``pip install
-e ".[aot]"``) builds compile-only devices for a topology such as
``v5p:2x2x4`` or ``h100:8`` (``aot_target``) and compiles real TPU / GPU
executables for them: the compiler decides the layouts, the collectives,
the fusion and the memory, exactly as on the pod or GPU host, without
one.

For a run config this module builds the run's mesh over those devices,
abstract parameters in their training shardings (shapes from the model
config: ``model.arch_name`` or the ``arch`` of a random model; no weights
or tokenizer are read), and compiles every jitted stage of an RL step
with the config's real shapes and shardings:

* the sampler as it runs (``sampler._sample`` on ``rl.sample_chunk``
  prompts: prefill, the G-fold cache, the whole decode loop, static or
  refilled), one executable reported as two stages that share its memory:
  ``decode`` (the decode loop's FLOPs and bytes, at most
  ``max_new_tokens - 1`` steps, ``ceil(P·G / slots)·max_new_tokens``
  refilled) and ``prefill`` (the rest of the program);
* ``update``: ``update.update_step`` (micro-batches, the prompt layout,
  LoRA, the KL term);
* ``logprobs``: ``update.completion_logprobs`` when the step recomputes
  π_old (``rl.num_iterations > 1``) or takes reference log-probs
  (``loss.kl_beta > 0``);
* ``warmup``: ``warmup.sft_step`` when the warm-up is on.

Per stage and chip it reports the compiler's memory (arguments, outputs,
temporaries, code and their peak, plus what stays resident in HBM outside
the stage's arguments: the optimizer state while sampling, a KL reference
copy), FLOPs and bytes accessed with loop trip counts (``hlo_cost``; XLA's
``cost_analysis()`` counts every loop body once, also reported), the
roofline time on the chip (``CHIPS``) and whether the stage fits.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from multians_jax import config as config_lib
from multians_jax import sharding
from multians_jax import warmup as warmup_lib
from multians_jax.aot import memory
from multians_jax.aot import report as aot_report
from multians_jax.aot import target as aot_target
from multians_jax.data import pipeline as data
from multians_jax.model import lora, sampler
from multians_jax.model import transformer as model_lib
from multians_jax.rl import update as update_lib

GiB = memory.GiB
AotError = aot_target.AotError
Target = aot_target.Target


# ---------------------------------------------------------------------------
# Abstract inputs


def _sds(shape, dtype, mesh, axes, rules):
  spec = sharding.spec_for(axes, shape, mesh, rules)
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _replicated(mesh, shape=(), dtype=jnp.int32):
  return jax.ShapeDtypeStruct(
    shape, dtype, sharding=NamedSharding(mesh, PartitionSpec())
  )


def abstract_policy(mcfg: model_lib.ModelConfig, mesh):
  """(graphdef, parameter state of sharded ShapeDtypeStructs) in the
  training layout (``TRAIN_RULES``), as the loop holds the policy."""
  graphdef, state = nnx.split(model_lib.abstract_model(mcfg))
  shardings = model_lib.state_shardings(state, mesh, sharding.TRAIN_RULES)
  sds = jax.tree.map(
    lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
    state,
    shardings,
    is_leaf=lambda v: isinstance(v, nnx.Variable),
  )
  return graphdef, sds


def _abstract_opt(tx, trainable):
  shard = update_lib.opt_shardings(trainable, tx)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    jax.eval_shape(tx.init, trainable),
    shard,
  )


def per_chip_bytes(tree, mesh) -> float:
  return memory.tree_bytes(tree, dict(mesh.shape))[1]


# ---------------------------------------------------------------------------
# Stages


@dataclasses.dataclass
class Stage:
  """One jitted computation to compile: ``fn.lower(*args, **kw)`` under
  ``rules``; ``bound``: the trip count of its data-dependent loop;
  ``resident``: per-chip bytes that stay in HBM outside its arguments;
  ``loop_only``: report the cost of its largest loop (the decode loop)."""

  fn: Any
  args: tuple
  kw: dict
  rules: sharding.Rules
  bound: int = 1
  resident: float = 0.0
  loop_only: bool = False
  calls_per_step: float = 1.0
  note: str = ""


def shapes(run: config_lib.RunConfig) -> dict:
  """The step's worst-case shapes: prompts per sampler call, G, the prompt
  bucket T (``data.max_prompt_len`` bucketed), the cap L."""
  d = run.data
  p = d.prompts_per_step
  chunk = min(p, run.rl.sample_chunk or p)
  return dict(
    prompts=p,
    chunk=chunk,
    g=run.rl.num_generations,
    t=data.bucket_length(d.max_prompt_len, d.min_bucket, d.max_prompt_len),
    l=run.sampler.max_new_tokens,
  )


@dataclasses.dataclass
class _Ctx:
  """What every stage builder reads: the run, the mesh, the abstract
  policy and optimizer state, the step's shapes, resident bytes."""

  run: config_lib.RunConfig
  mesh: Any
  mcfg: model_lib.ModelConfig
  graphdef: Any
  params: Any
  trainable: Any
  tx: Any
  opt: Any
  sh: dict
  opt_bytes: float
  ref_bytes: float

  def row(self, shape, dtype):
    """A [B, ...] array sharded over the batch axes (training rules)."""
    axes = ("batch",) + (None,) * (len(shape) - 1)
    return _sds(shape, dtype, self.mesh, axes, sharding.TRAIN_RULES)


def build_stages(run: config_lib.RunConfig, mesh) -> tuple[dict, dict]:
  """name → Stage for every jitted stage of one RL step, and facts about
  the model (parameter count, per-chip state bytes)."""
  mcfg = memory.model_config(run)
  sh = shapes(run)
  if mcfg.max_seq_len < sh["t"] + sh["l"]:
    raise AotError(
      f"prompt bucket {sh['t']} + max_new_tokens {sh['l']} exceeds the "
      f"model's max_seq_len {mcfg.max_seq_len}"
    )
  graphdef, params = abstract_policy(mcfg, mesh)
  trainable, _ = lora.partition(params)
  tx = update_lib.optimizer(run.optim_config)
  opt = _abstract_opt(tx, trainable)
  state_bytes = per_chip_bytes(params, mesh)
  # A KL reference without LoRA is a second copy of the weights.
  kl_copy = run.loss.kl_beta > 0 and not lora.has_adapters(params)
  ctx = _Ctx(
    run, mesh, mcfg, graphdef, params, trainable, tx, opt, sh,
    per_chip_bytes(opt, mesh), state_bytes if kl_copy else 0.0,
  )  # fmt: skip
  stages = {"decode": _sampler_stage(ctx)}
  stages.update(_update_stages(ctx))
  if run.warmup.steps:
    stages["warmup"] = _warmup_stage(ctx)
  info = dict(
    params=model_lib.param_count(mcfg),
    trainable=sum(math.prod(x.shape) for x in jax.tree.leaves(trainable)),
    shapes=sh,
    model=mcfg,
  )
  return stages, info


def _sampler_stage(ctx: _Ctx) -> Stage:
  """``sampler._sample`` on ``rl.sample_chunk`` prompts as the loop calls
  it (the policy in its training layout, the sampling rules active)."""
  run, mesh, sh, mcfg = ctx.run, ctx.mesh, ctx.sh, ctx.mcfg
  chunk, g, t, steps = sh["chunk"], sh["g"], sh["t"], sh["l"]
  samp = sharding.SAMPLE_RULES
  scfg = run.sampling_for(mcfg)
  scfg = dataclasses.replace(scfg, stop_ids=scfg.stop_ids or (0,))
  tokens = _sds((chunk, t), jnp.int32, mesh, ("batch", None), samp)
  mask = _sds((chunk, t), jnp.bool_, mesh, ("batch", None), samp)
  key = _replicated(mesh, (2,), jnp.uint32)
  refill = 0 < scfg.slots < chunk * g
  bound = math.ceil(chunk * g / scfg.slots) * steps if refill else steps - 1
  note = ("refilled" if refill else "static") + (
    f", {chunk} prompts x {g} per call, loop bound {bound} steps"
  )
  (rows,) = sharding.spec_for(("batch",), (chunk,), mesh, samp)
  shards = math.prod(mesh.shape[a] for a in samp.lookup("batch"))
  if rows is None or chunk % shards:
    note += (
      f"; the prefill's {chunk} prompts do not divide over the {shards}-way "
      "batch axes: each chip prefills them all (replicated)"
    )
  return Stage(
    sampler._sample, (ctx.graphdef, ctx.params, tokens, mask, key),
    dict(cfg=scfg, num_samples=g), samp, bound=bound,
    resident=ctx.opt_bytes + ctx.ref_bytes, loop_only=True,
    calls_per_step=sh["prompts"] / chunk, note=note,
  )  # fmt: skip


def _update_stages(ctx: _Ctx) -> dict:
  """``update.update_step`` on the step's B rows of prompt bucket + cap,
  and the log-prob pass when the step takes one."""
  run, sh, row = ctx.run, ctx.sh, ctx.row
  b, steps, s = sh["prompts"] * sh["g"], sh["l"], sh["t"] + sh["l"]
  per_token = run.rl.credit not in ("", "sequence", "none")
  batch = update_lib.UpdateBatch(
    row((b, s), jnp.int32),
    row((b, s), jnp.int32),
    row((b, s), jnp.bool_),
    row((b, steps), jnp.bool_),
    row((b, steps), jnp.float32),
    row((b, steps) if per_token else (b,), jnp.float32),
    row((b,), jnp.bool_),
    row((b, steps), jnp.float32) if run.loss.kl_beta > 0 else None,
  )
  ucfg = run.update_config
  one = _replicated(ctx.mesh)
  ts = update_lib.TrainState(one, ctx.params, ctx.opt, one)
  train = sharding.TRAIN_RULES
  out = {
    "update": Stage(
      update_lib.update_step, (ctx.graphdef, ts, batch),
      dict(tx=ctx.tx, cfg=ucfg), train, resident=ctx.ref_bytes,
      calls_per_step=run.rl.num_iterations,
    )
  }  # fmt: skip
  n_logp = (run.rl.num_iterations > 1) + (run.loss.kl_beta > 0)
  if n_logp:
    out["logprobs"] = Stage(
      update_lib.completion_logprobs, (ctx.graphdef, ctx.params, batch),
      dict(cfg=ucfg), train, resident=ctx.opt_bytes + ctx.ref_bytes,
      calls_per_step=n_logp,
    )  # fmt: skip
  return out


def _warmup_stage(ctx: _Ctx) -> Stage:
  """``warmup.sft_step`` on ``warmup.batch_prompts`` rows."""
  w, row = ctx.run.warmup, ctx.row
  wtx = warmup_lib.sft_optimizer(w)
  wopt = _abstract_opt(wtx, ctx.trainable)
  wb, ws = w.batch_prompts, ctx.sh["t"] + w.max_target_len
  return Stage(
    warmup_lib.sft_step,
    (ctx.graphdef, ctx.params, wopt, row((wb, ws), jnp.int32),
     row((wb, ws), jnp.bool_), row((wb, ws), jnp.int32),
     row((wb, w.max_target_len), jnp.bool_)),
    dict(tx=wtx, chunk=ctx.run.rl.logprob_chunk),
    sharding.TRAIN_RULES,
    calls_per_step=0.0,  # before RL, not part of a step
  )  # fmt: skip


# ---------------------------------------------------------------------------
# Compile and report


def compile_stage(stage: Stage, mesh):
  with sharding.activate(mesh, stage.rules):
    lowered = stage.fn.lower(*stage.args, **stage.kw)
  return lowered.compile()


def run_aot(run, topology: str, stages=None, progress=print) -> dict:
  """Compiles the run's stages for ``topology``; returns the aot.json
  dict. A stage that fails to compile is reported with its error."""
  run = memory.run_config(run)
  tgt = aot_target.target(topology)
  aot_target.check_attention(memory.model_config(run), tgt)
  mesh = aot_target.make_mesh(run, tgt)
  built, info = build_stages(run, mesh)
  if stages:
    unknown = sorted(set(stages) - set(built))
    if unknown:
      raise AotError(f"unknown or inactive stage(s) {unknown}: {sorted(built)}")
    built = {k: v for k, v in built.items() if k in stages}
  planner = aot_report.planner_peaks(run, dict(mesh.shape))
  out_stages = {}
  for name, stage in built.items():
    progress(f"compiling {name} for {topology} ...")
    out_stages.update(_compile_one(name, stage, mesh, tgt, planner))
  chips = len(tgt.devices)
  sh = info["shapes"]
  result = dict(
    topology=topology,
    chips=chips,
    hosts=tgt.hosts,
    chip=tgt.chip.name,
    platform=tgt.chip.platform,
    hbm_bytes_per_chip=tgt.chip.hbm_bytes,
    hbm_budget_bytes_per_chip=tgt.chip.budget_bytes,
    chip_bf16_flops=tgt.chip.bf16_flops,
    chip_hbm_bandwidth=tgt.chip.hbm_bandwidth,
    chip_source=tgt.chip.source,
    mesh=dict(mesh.shape),
    attention=info["model"].attention,
    params=info["params"],
    vocab=info["model"].vocab_size,
    d_model=info["model"].d_model,
    tied=bool(info["model"].tie_embeddings),
    trainable_params=info["trainable"],
    shapes=sh,
    stages=out_stages,
    fits=all(s.get("fits", False) for s in out_stages.values()),
  )
  result["step"] = aot_report.step_estimate(result, run)
  return result


def _compile_one(name, stage: Stage, mesh, tgt: Target, planner) -> dict:
  """{stage name: its report} (the sampler gives two: prefill and
  decode); a stage the compiler rejects is reported with its message, one
  over the chip's HBM with the bytes and the setting to change."""
  t0 = time.perf_counter()
  try:
    compiled = compile_stage(stage, mesh)
  except Exception as e:  # the compiler's message, kept whole
    return {
      name: aot_report.failure(name, e, tgt.chip, time.perf_counter() - t0)
    }
  rep = aot_report.report_stage(
    name, stage, compiled, tgt.chip, time.perf_counter() - t0
  )
  phase = "update" if name in ("update", "logprobs", "warmup") else "sampling"
  rep["planner_peak_bytes_per_chip"] = int(planner[phase])
  out = {}
  if "outside_loop" in rep:  # the sampler: prefill + decode loop
    out["prefill"] = aot_report.prefill_part(rep, tgt.chip)
  out[name] = rep
  return out
