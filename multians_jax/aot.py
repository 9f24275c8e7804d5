"""Ahead-of-time compilation of one RL step for a named TPU topology (the
library behind ``tools/aot.py``).

A CPU host with ``libtpu`` installed (``pip install -e ".[aot]"``) builds
compile-only TPU devices for a topology such as ``v5p:2x2x4``
(``jax.experimental.topologies``) and compiles real TPU executables for
them: the compiler decides the layouts, the collectives, the fusion and
the memory, exactly as on the pod, without one.

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
  (``rl.kl_beta > 0``);
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
import functools
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from multians_jax import config as config_lib
from multians_jax import data, hlo_cost, lora, memory, sampler, sharding
from multians_jax import model as model_lib
from multians_jax import update as update_lib
from multians_jax import warmup as warmup_lib

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures: dense bf16 peak FLOP/s, HBM bandwidth
  (bytes/s) and HBM capacity (bytes)."""

  name: str
  bf16_flops: float
  hbm_bandwidth: float
  hbm_bytes: int
  source: str


# Per-chip figures from the vendors' product pages (2026-12):
#   cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e ("System architecture"
#   tables: peak bf16 TFLOPs, HBM capacity and bandwidth per chip);
#   nvidia.com/en-us/data-center/h100 (H100 SXM: 989 TFLOPS dense bf16,
#   80 GB HBM3 at 3.35 TB/s).
CHIPS = {
  "v4": Chip("v4", 275e12, 1228e9, 32 * GiB, "cloud.google.com/tpu/docs/v4"),
  "v5e": Chip("v5e", 197e12, 819e9, 16 * GiB, "cloud.google.com/tpu/docs/v5e"),
  "v5p": Chip("v5p", 459e12, 2765e9, 95 * GiB, "cloud.google.com/tpu/docs/v5p"),
  "v6e": Chip("v6e", 918e12, 1640e9, 32 * GiB, "cloud.google.com/tpu/docs/v6e"),
  "h100": Chip(
    "h100", 989e12, 3350e9, 80 * 10**9, "nvidia.com/en-us/data-center/h100"
  ),
}
# device_kind as libtpu names it → CHIPS key
_KINDS = {
  "TPU v4": "v4",
  "TPU v5 lite": "v5e",
  "TPU v5e": "v5e",
  "TPU v5": "v5p",
  "TPU v5p": "v5p",
  "TPU v6 lite": "v6e",
  "TPU v6e": "v6e",
}


class AotError(Exception):
  """A stage that cannot be compiled for the target, or a bad target."""


# ---------------------------------------------------------------------------
# Targets


@dataclasses.dataclass
class Target:
  topology: str
  devices: list
  chip: Chip
  hosts: int

  @property
  def platform(self) -> str:
    return self.devices[0].platform


def target(topology: str) -> Target:
  """Compile-only devices of a named TPU topology (``v5p:2x2x4``,
  ``v5e:2x2``, ``v6e:8x8`` ...)."""
  if ":" not in topology:
    raise AotError(
      f"--topology must be GENERATION:SHAPE, e.g. v5p:2x2x4 or v5e:2x2: "
      f"{topology!r}"
    )
  gen = topology.split(":")[0].lower()
  if gen not in CHIPS or gen == "h100":
    raise AotError(
      f"unknown TPU generation {gen!r} in {topology!r} (known: "
      f"{sorted(k for k in CHIPS if k != 'h100')})"
    )
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise AotError(
      'compiling for TPU needs libtpu: pip install -e ".[aot]" (jax[tpu])'
    ) from None
  try:
    devices = _topology_devices(topology)
  except Exception as e:  # libtpu's message names the problem
    raise AotError(f"topology {topology!r} not known to libtpu: {e}") from e
  kind = _KINDS.get(devices[0].device_kind)
  if kind != gen:
    raise AotError(
      f"topology {topology!r} resolved to {devices[0].device_kind!r} chips"
    )
  hosts = len({d.process_index for d in devices})
  return Target(topology, devices, CHIPS[gen], hosts)


@functools.cache
def _topology_devices(topology: str) -> list:
  """The compile-only devices of a topology, made once per process: jit
  caches key on device objects, so a second description of the same
  topology would clash with executables traced for the first."""
  from jax.experimental import topologies

  topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  return list(topo.devices)


def make_mesh(run: config_lib.RunConfig, tgt: Target):
  """The run's (data, fsdp, tensor) mesh over the target's devices."""
  try:
    sizes = sharding.fill_mesh(run.mesh.shape, len(tgt.devices))
  except ValueError as e:
    raise AotError(f"mesh: {e}") from None
  if math.prod(sizes) != len(tgt.devices):
    named = dict(zip(sharding.MESH_AXES, sizes, strict=True))
    raise AotError(
      f"mesh {named} ({math.prod(sizes)} devices) does not tile "
      f"{tgt.topology} ({len(tgt.devices)} chips): set --config.mesh.* so "
      "that the sizes multiply to the chip count (one may be -1)"
    )
  try:
    return sharding.make_mesh(*sizes, devices=tgt.devices)
  except Exception:  # device order by id when the topology-aware one fails
    arr = np.array(tgt.devices).reshape(sizes)
    return jax.sharding.Mesh(arr, sharding.MESH_AXES)


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


def build_stages(run: config_lib.RunConfig, mesh) -> tuple[dict, dict]:
  """name → Stage for every jitted stage of one RL step, and facts about
  the model (parameter count, per-chip state bytes)."""
  mcfg = memory.model_config(run)
  if mcfg.max_seq_len < shapes(run)["t"] + run.sampler.max_new_tokens:
    raise AotError(
      f"prompt bucket + max_new_tokens exceeds model max_seq_len "
      f"{mcfg.max_seq_len}"
    )
  graphdef, params = abstract_policy(mcfg, mesh)
  trainable, _ = lora.partition(params)
  tx = update_lib.optimizer(run.optim_config)
  opt = _abstract_opt(tx, trainable)
  sh = shapes(run)
  p, chunk, g, t = sh["prompts"], sh["chunk"], sh["g"], sh["t"]
  l = sh["l"]  # noqa: E741 (shape letter L of sampler.py)
  b = p * g
  train, samp = sharding.TRAIN_RULES, sharding.SAMPLE_RULES
  state_bytes = per_chip_bytes(params, mesh)
  opt_bytes = per_chip_bytes(opt, mesh)
  # A KL reference without LoRA is a second copy of the weights.
  ref_bytes = (
    state_bytes
    if run.loss.kl_beta > 0 and not lora.has_adapters(params)
    else 0.0
  )
  stop_ids = tuple(mcfg.eos_ids) or (0,)
  pad_id = mcfg.pad_token_id if mcfg.pad_token_id is not None else 0
  scfg = dataclasses.replace(
    run.sampling, stop_ids=stop_ids, pad_id=pad_id, min_prompt_bucket=0
  )
  calls = p / chunk
  tokens = _sds((chunk, t), jnp.int32, mesh, ("batch", None), samp)
  mask = _sds((chunk, t), jnp.bool_, mesh, ("batch", None), samp)
  key = _replicated(mesh, (2,), jnp.uint32)
  refill = 0 < scfg.slots < chunk * g
  bound = math.ceil(chunk * g / scfg.slots) * l if refill else l - 1

  stages = {
    "decode": Stage(
      sampler._sample,
      (graphdef, params, tokens, mask, key),
      dict(cfg=scfg, num_samples=g),
      samp,
      bound=bound,
      resident=opt_bytes + ref_bytes,
      loop_only=True,
      calls_per_step=calls,
      note=("refilled" if refill else "static")
      + f", {chunk} prompts x {g} per call, loop bound {bound} steps",
    ),
  }  # fmt: skip
  (rows,) = sharding.spec_for(("batch",), (chunk,), mesh, samp)
  shards = math.prod(
    mesh.shape[a] for a in sharding.SAMPLE_RULES.lookup("batch")
  )
  if rows is None or chunk % shards:
    stages["decode"].note += (
      f"; the prefill's {chunk} prompts do not divide over the {shards}-way "
      "batch axes: each chip prefills them all (replicated)"
    )
  # The update batch: B rows of prompt bucket + cap.
  row = lambda shape, dtype: _sds(
    shape, dtype, mesh, ("batch",) + (None,) * (len(shape) - 1), train
  )
  s = t + l
  per_token = run.rl.credit not in ("", "sequence", "none")
  batch = update_lib.UpdateBatch(
    row((b, s), jnp.int32),
    row((b, s), jnp.int32),
    row((b, s), jnp.bool_),
    row((b, l), jnp.bool_),
    row((b, l), jnp.float32),
    row((b, l) if per_token else (b,), jnp.float32),
    row((b,), jnp.bool_),
    row((b, l), jnp.float32) if run.loss.kl_beta > 0 else None,
  )
  ucfg = update_lib.UpdateConfig(
    loss=run.loss,
    micro_batches=run.rl.micro_batches,
    temperature=max(run.sampler.temperature, 1e-6),
    logprob_chunk=run.rl.logprob_chunk,
    group_size=g if run.rl.share_prompt else 1,
    support=run.sampling.support,
  )
  ts = update_lib.TrainState(_replicated(mesh), params, opt, _replicated(mesh))
  stages["update"] = Stage(
    update_lib.update_step, (graphdef, ts, batch), dict(tx=tx, cfg=ucfg),
    train, resident=ref_bytes, calls_per_step=run.rl.num_iterations,
  )  # fmt: skip
  n_logp = (run.rl.num_iterations > 1) + (run.loss.kl_beta > 0)
  if n_logp:
    stages["logprobs"] = Stage(
      update_lib.completion_logprobs, (graphdef, params, batch),
      dict(cfg=ucfg), train, resident=opt_bytes + ref_bytes,
      calls_per_step=n_logp,
    )  # fmt: skip
  w = run.warmup
  if w.steps:
    wtx = warmup_lib.optimizer(w)
    wopt = _abstract_opt(wtx, trainable)
    wb, ws = w.batch_prompts, t + w.max_target_len
    stages["warmup"] = Stage(
      warmup_lib.sft_step,
      (graphdef, params, wopt, row((wb, ws), jnp.int32),
       row((wb, ws), jnp.bool_), row((wb, ws), jnp.int32),
       row((wb, w.max_target_len), jnp.bool_)),
      dict(tx=wtx, chunk=run.rl.logprob_chunk),
      train,
      calls_per_step=0.0,  # before RL, not part of a step
    )  # fmt: skip
  info = dict(
    params=model_lib.param_count(mcfg),
    trainable=sum(math.prod(x.shape) for x in jax.tree.leaves(trainable)),
    state_bytes_per_chip=state_bytes,
    opt_bytes_per_chip=opt_bytes,
    shapes=sh,
    model=mcfg,
  )
  return stages, info


# ---------------------------------------------------------------------------
# Compile and report


def compile_stage(stage: Stage, mesh):
  with sharding.activate(mesh, stage.rules):
    lowered = stage.fn.lower(*stage.args, **stage.kw)
  return lowered.compile()


def _out_of_memory(msg: str):
  """(bytes needed, bytes available) from the TPU compiler's refusal of a
  program over the chip's HBM, else None."""
  m = re.search(
    r"RESOURCE_EXHAUSTED.*?\(([\d.]+)([KMGT])\) exceeds available HBM "
    r"\(([\d.]+)([KMGT])\)", msg, re.DOTALL,
  )  # fmt: skip
  if not m:
    return None
  unit = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
  return (
    int(float(m.group(1)) * unit[m.group(2)]),
    int(float(m.group(3)) * unit[m.group(4)]),
  )


def _advice(name: str) -> str:
  return {
    "prefill": "lower rl.sample_chunk (prompts per sampler call)",
    "decode": "lower rl.sample_chunk or sampler.slots, or use "
    "sampler.cache_dtype=bfloat16",
    "update": "raise rl.micro_batches, set model.remat=full, or train LoRA "
    "adapters (model.lora_rank)",
    "logprobs": "raise rl.micro_batches or lower rl.logprob_chunk",
    "warmup": "lower warmup.batch_prompts",
  }.get(name, "use a larger slice")


def report_stage(name, stage: Stage, compiled, chip: Chip, seconds: float):
  ma = compiled.memory_analysis()
  args = int(ma.argument_size_in_bytes)
  outs = int(ma.output_size_in_bytes)
  alias = int(ma.alias_size_in_bytes)
  temp = int(ma.temp_size_in_bytes)
  code = int(ma.generated_code_size_in_bytes)
  peak = args + outs - alias + temp + code
  total = peak + int(stage.resident)
  prog = hlo_cost.Program(compiled.as_text())
  cost = prog.cost(bounds={"": stage.bound})
  flops, nbytes = cost.flops, cost.bytes_accessed
  step_flops = step_bytes = None
  outside = None
  if stage.loop_only:
    # The decode loop's share: the program at its bound minus the program
    # with the loop run zero times (the rest: prefill, cache repeat).
    rest = prog.cost(bounds={"": 0})
    outside = (rest.flops, rest.bytes_accessed)
    flops, nbytes = flops - rest.flops, nbytes - rest.bytes_accessed
    step_flops, step_bytes = flops / stage.bound, nbytes / stage.bound
  xla = compiled.cost_analysis() or {}
  if isinstance(xla, list):  # older jax: one dict per program
    xla = xla[0] if xla else {}
  roof = max(flops / chip.bf16_flops, nbytes / chip.hbm_bandwidth)
  out = dict(
    peak_bytes_per_chip=total,
    compiled_peak_bytes_per_chip=peak,
    resident_bytes_per_chip=int(stage.resident),
    argument_bytes=args,
    output_bytes=outs,
    alias_bytes=alias,
    temp_bytes=temp,
    code_bytes=code,
    flops_per_chip=flops,
    bytes_accessed_per_chip=nbytes,
    xla_flops_per_chip=float(xla.get("flops", 0.0)),
    xla_bytes_accessed_per_chip=float(xla.get("bytes accessed", 0.0)),
    loops=[[b, n, how] for b, n, how in cost.loops],
    custom_calls=cost.custom_calls,
    mosaic_calls=cost.mosaic_calls,
    mosaic_kernels=cost.mosaic_kernels,
    roofline_seconds=roof,
    bound="compute"
    if flops / chip.bf16_flops >= nbytes / chip.hbm_bandwidth
    else "memory",  # fmt: skip
    calls_per_step=stage.calls_per_step,
    compile_seconds=seconds,
    fits=total <= chip.hbm_bytes,
  )
  if step_flops is not None:
    out.update(step_flops_per_chip=step_flops, step_bytes_per_chip=step_bytes)
  if stage.note:
    out["note"] = stage.note
  if outside is not None:
    out["outside_loop"] = outside
  if not out["fits"]:
    over = total - chip.hbm_bytes
    out["advice"] = (
      f"{name} needs {total / GiB:.2f} GiB per chip, {over / GiB:.2f} GiB "
      f"over the {chip.name}'s {chip.hbm_bytes / GiB:.0f} GiB: " + _advice(name)
    )
  return out


def planner_peaks(run, mesh_sizes: dict) -> dict:
  """tools/memory.py's per-device peaks (sampling, update) for the same
  config and mesh, in bytes."""
  plan = memory.plan_from_config(run, tuple(mesh_sizes.values()))
  return memory.peaks(plan, memory.estimate(plan))


def run_aot(run, topology: str, stages=None, progress=print) -> dict:
  """Compiles the run's stages for ``topology``; returns the aot.json
  dict. A stage that fails to compile is reported with its error."""
  run = memory.run_config(run)
  tgt = target(topology)
  mesh = make_mesh(run, tgt)
  built, info = build_stages(run, mesh)
  if stages:
    unknown = sorted(set(stages) - set(built))
    if unknown:
      raise AotError(f"unknown or inactive stage(s) {unknown}: {sorted(built)}")
    built = {k: v for k, v in built.items() if k in stages}
  planner = planner_peaks(run, dict(mesh.shape))
  out_stages = {}
  for name, stage in built.items():
    progress(f"compiling {name} for {topology} ...")
    t0 = time.perf_counter()
    try:
      compiled = compile_stage(stage, mesh)
    except Exception as e:  # the compiler's message, kept whole
      oom = _out_of_memory(str(e))
      if oom is None:
        out_stages[name] = dict(
          error=f"{type(e).__name__}: {e}", fits=False,
          compile_seconds=time.perf_counter() - t0,
        )  # fmt: skip
        continue
      need, have = oom  # the compiler refuses a program over the chip's HBM
      out_stages[name] = dict(
        fits=False,
        out_of_memory=str(e).strip().splitlines()[0][:500],
        temp_bytes=need,
        compiler_hbm_bytes=have,
        compile_seconds=time.perf_counter() - t0,
        advice=f"{name} needs {need / GiB:.2f} GiB of temporaries per chip, "
        f"{(need - have) / GiB:.2f} GiB over the {have / GiB:.2f} GiB the "
        f"compiler allows on a {tgt.chip.name}: " + _advice(name),
      )
      continue
    rep = report_stage(
      name, stage, compiled, tgt.chip, time.perf_counter() - t0
    )
    phase = "update" if name in ("update", "logprobs", "warmup") else "sampling"
    rep["planner_peak_bytes_per_chip"] = int(planner[phase])
    if "outside_loop" in rep:  # the sampler: prefill + decode loop
      f, b = rep.pop("outside_loop")
      pre = {k: v for k, v in rep.items() if not k.startswith("step_")}
      pre.update(
        flops_per_chip=f, bytes_accessed_per_chip=b,
        roofline_seconds=max(f / tgt.chip.bf16_flops,
                             b / tgt.chip.hbm_bandwidth),
        note="the sampler executable outside its decode loop (prefill, "
        "cache repeat); memory is the whole sampler's",
      )  # fmt: skip
      pre["bound"] = (
        "compute"
        if f / tgt.chip.bf16_flops >= b / tgt.chip.hbm_bandwidth
        else "memory"
      )
      pre.pop("advice", None)
      out_stages["prefill"] = pre
    out_stages[name] = rep
    del compiled
  chips = len(tgt.devices)
  sh = info["shapes"]
  result = dict(
    topology=topology,
    chips=chips,
    hosts=tgt.hosts,
    chip=tgt.chip.name,
    hbm_bytes_per_chip=tgt.chip.hbm_bytes,
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
  result["step"] = step_estimate(result, run)
  return result


def step_estimate(res: dict, run) -> dict:
  """Roofline time of one RL step from its stages (sampling: prefill and
  decode per sampler call; the update ``rl.num_iterations`` times), the
  tokens it generates at the cap, and the update's compiled FLOPs against
  the model's 6·N·tokens."""
  st = res["stages"]
  sh = res["shapes"]
  ok = lambda n: (
    n in st and "error" not in st[n] and "out_of_memory" not in st[n]
  )
  if not all(ok(n) for n in ("prefill", "decode", "update")):
    return {}  # no estimate of a step that does not compile whole
  sample = sum(
    st[n]["roofline_seconds"] * st[n]["calls_per_step"]
    for n in ("prefill", "decode")
    if ok(n)
  )
  upd = sum(
    st[n]["roofline_seconds"] * st[n]["calls_per_step"]
    for n in ("update", "logprobs")
    if ok(n)
  )
  b = sh["prompts"] * sh["g"]
  gen = b * sh["l"]
  chips = res["chips"]
  out = dict(
    sample_seconds=sample,
    update_seconds=upd,
    step_seconds=sample + upd,
    generated_tokens=gen,
    tokens_per_second_per_chip=gen / max(sample + upd, 1e-12) / chips,
  )
  shared = run.rl.share_prompt and sh["g"] > 1
  trained = (sh["prompts"] * sh["t"] if shared else b * sh["t"]) + b * sh["l"]
  if ok("update"):
    # 6 FLOPs per parameter per trained token (forward 2, backward 4) for
    # the decoder layers, and for the LM head on completion tokens only
    # (the update computes no logits at prompt positions); the embedding
    # lookup is no matmul. Remat, attention and the head's chunking make
    # the compiled count larger.
    head = res["vocab"] * res["d_model"]
    body = res["params"] - head * (1 if res["tied"] else 2)
    model = 6.0 * (body * trained + head * b * sh["l"]) / chips
    out["update_model_flops_per_chip"] = model
    out["update_compiled_over_model_flops"] = (
      st["update"]["flops_per_chip"] / model
    )
  if ok("decode"):
    tok = sh["chunk"] * sh["g"]
    model = 2.0 * res["params"] * tok / chips
    if "step_flops_per_chip" in st["decode"]:
      out["decode_step_model_flops_per_chip"] = model
      out["decode_step_compiled_over_model_flops"] = (
        st["decode"]["step_flops_per_chip"] / model
      )
  return out


def format_table(res: dict) -> str:
  g = lambda x: f"{x / GiB:8.2f}"
  lines = [
    f"{res['topology']}: {res['chips']} {res['chip']} chips, {res['hosts']} "
    f"host(s), {res['hbm_bytes_per_chip'] / GiB:.0f} GiB HBM per chip; mesh "
    + ", ".join(f"{k}={v}" for k, v in res["mesh"].items())
    + f"; attention={res['attention']}; {res['params'] / 1e9:.2f} B params",
    "",
    f"{'stage':<9} {'peak GiB':>8} {'args':>8} {'temp':>8} {'resid.':>8} "
    f"{'planner':>8} {'TFLOP':>9} {'GB acc.':>9} {'roofline s':>10}  verdict",
  ]
  for name, s in res["stages"].items():
    if "error" in s:
      lines.append(f"{name:<9} FAILED TO COMPILE: {s['error'][:400]}")
      continue
    if "out_of_memory" in s:
      lines.append(
        f"{name:<9} {'>' + format(s['temp_bytes'] / GiB, '.2f'):>8} "
        "(the compiler ran out of HBM)  DOES NOT FIT"
      )
      continue
    lines.append(
      f"{name:<9} {g(s['peak_bytes_per_chip'])} {g(s['argument_bytes'])} "
      f"{g(s['temp_bytes'])} {g(s['resident_bytes_per_chip'])} "
      f"{g(s['planner_peak_bytes_per_chip'])} "
      f"{s['flops_per_chip'] / 1e12:9.2f} "
      f"{s['bytes_accessed_per_chip'] / 1e9:9.2f} "
      f"{s['roofline_seconds']:10.3f}  "
      + ("fits" if s["fits"] else "DOES NOT FIT")
    )
  for s in res["stages"].values():
    if "advice" in s:
      lines.append("  " + s["advice"])
  st = res["step"]
  failed = [n for n, s in res["stages"].items() if "error" in s]
  if failed:
    lines.append(f"\nverdict: FAILED TO COMPILE: {', '.join(failed)}")
    return "\n".join(lines)
  if not st:
    lines.append("\n(no step estimate: not every stage was compiled)")
    lines.append("verdict: " + ("FITS" if res["fits"] else "DOES NOT FIT"))
    return "\n".join(lines)
  lines += [
    "",
    f"step at roofline: sampling {st['sample_seconds']:.2f} s + update "
    f"{st['update_seconds']:.2f} s = {st['step_seconds']:.2f} s; "
    f"{st['tokens_per_second_per_chip']:.0f} generated tokens/s/chip "
    "(compiled estimate, not a measurement)",
  ]
  if "update_compiled_over_model_flops" in st:
    lines.append(
      f"update FLOPs {st['update_compiled_over_model_flops']:.2f}x the "
      "model's 6·N·tokens"
    )
  lines.append("verdict: " + ("FITS" if res["fits"] else "DOES NOT FIT"))
  return "\n".join(lines)


def quiet_env() -> None:
  """Keeps libtpu from looking for a local TPU (a CPU host compiles for
  named topologies only)."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # libtpu takes a machine-wide lock per process; compile-only use touches
  # no chip, so several processes (tests, a CLI beside them) may load it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
