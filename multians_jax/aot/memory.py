"""Per-device memory plan of a training config, before paying for devices
(the model behind ``tools/memory.py``).

Shapes come from ``jax.eval_shape`` (nothing is allocated): the model's
parameters (``model.abstract_model``), AdamW's state (``tx.init``), the KV
cache of the sampler. Each tensor is divided by the mesh axes its
``PartitionSpec`` uses (``sharding.spec_for`` with ``TRAIN_RULES`` /
``SAMPLE_RULES``), computed arithmetically from the mesh sizes, so a v5p-32
(16 chips) or 8×H100 plan needs no such devices here.

Shape letters: P prompts, G generations, B = P·G rows, M micro-batches,
b = B/M rows per micro-batch, T prompt bucket, L completion tokens,
S = T + L, C log-prob chunk; model D, N, K, H, F, V, and NL layers.

Activations of the update step are a formula (``activation_bytes``) over the
per-device shapes of one micro-batch, per decoder layer (saved residuals for
the backward pass) plus the LM-head chunk. Its coefficients count the arrays
``layers.layer_fn`` keeps per token (D-, head- and F-sized, and with
``model.attention=xla`` the [N, S, S] attention probabilities in float32 +
compute dtype, which the fused ``cudnn`` / ``splash`` kernels never hold:
they keep a float32 log-sum-exp and max per query and head); they were
checked against ``memory_analysis()`` of the compiled ``update.update_step`` on
CPU (``--measure``, tests/test_memory.py): per-layer activations within
10 % for every remat mode, the update step's temporaries (gradients and
activations; the optimizer step needs none of the parameters' size) within
20 % without remat and with full remat, within 30 % with ``dots``.
bfloat16 runs keep some float32 copies (norms, RoPE) that the formula
counts at the compute dtype: treat bf16 figures as ±20 %.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from multians_jax import checkpoint, config, sharding, sources
from multians_jax.data import pipeline as data
from multians_jax.model import lora
from multians_jax.model import support as support_lib
from multians_jax.model import transformer as model_lib
from multians_jax.rl import microbatch, update

GiB = 1024**3
# Device memory (GiB) by accelerator name, for --device / config comments.
DEVICE_GB = {
  "v5p": 95,
  "v5e": 16,
  "v6e": 32,
  "v4": 32,
  "h100": 80,
  "h200": 141,
  "a100": 80,
}
# Arrays kept per token per decoder layer without remat (layers.layer_fn):
# D-sized (x, norms, residuals), per query / KV head dim, per MLP unit.
C_D, C_Q, C_K, C_F = 7.0, 4.5, 4.5, 6.0


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything that sizes memory: the model, the mesh, the batch."""

  model: model_lib.ModelConfig
  mesh: dict[str, int]  # data / fsdp / tensor sizes
  prompts: int  # P
  generations: int  # G
  prompt_bucket: int  # T
  new_tokens: int  # L
  micro_batches: int  # M
  chunk: int  # C
  cache_dtype: str
  sample_chunk: int = 0  # prompts per sampler call (0 = all P)
  sampler_slots: int = 0  # sampler.slots (0 = one cache row per sample row)
  # The sampler's top-k / top-p: the update's log-prob chunks then also
  # hold the support mask's sort and cumulative sums.
  support: support_lib.Support = support_lib.FULL
  micro_batch_tokens: int = 0  # rl.micro_batch_tokens (0: M equal ones)
  pack: bool = False  # rl.pack_completions: a group's completions one row

  @property
  def rows(self) -> int:
    return self.prompts * self.generations

  @property
  def row_tokens(self) -> int:
    """Positions of one update row at the cap: T + L, or packed T + G·L
    (a group's completions in one row; attention over all of them)."""
    g = self.generations if self.pack else 1
    return self.prompt_bucket + g * self.new_tokens

  @property
  def micro_rows(self) -> int:
    """Rows of the largest micro-batch: B / M, or under a token budget
    the groups that fit it when every completion reaches the cap; packed,
    one row per group (all groups without a budget)."""
    if self.pack:
      budget = self.micro_batch_tokens
      n = max(1, budget // self.row_tokens) if budget else self.prompts
      return min(self.prompts, n)
    if not self.micro_batch_tokens:
      return self.rows // self.micro_batches
    n = microbatch.groups_fitting(
      self.micro_batch_tokens,
      self.prompt_bucket,
      self.generations,
      self.new_tokens,
    )
    return min(self.rows, n * self.generations)

  @property
  def sample_rows(self) -> int:
    """Rows whose KV cache exists at once (rl.sample_chunk prompts × G)."""
    p = min(self.prompts, self.sample_chunk or self.prompts)
    return p * self.generations

  @property
  def devices(self) -> int:
    return math.prod(self.mesh.values())


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
  names = sharding.MESH_AXES
  return AbstractMesh(
    tuple(sizes[a] for a in names), names, axis_types=(AxisType.Auto,) * 3
  )


def mesh_sizes(spec: tuple[int, int, int], num_devices: int | None) -> dict:
  """(data, fsdp, tensor) with at most one -1 → a dict of sizes."""
  sizes = sharding.fill_mesh(spec, num_devices)
  return dict(zip(sharding.MESH_AXES, sizes, strict=True))


def shards(spec, sizes: dict[str, int]) -> int:
  """Number of pieces a ``PartitionSpec`` cuts a tensor into."""
  n = 1
  for entry in spec:
    for axis in (entry,) if isinstance(entry, str) else entry or ():
      n *= sizes[axis]
  return n


def _nbytes(x) -> int:
  return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def _factor(logical: str, dim: int, plan: Plan, rules) -> int:
  mesh = abstract_mesh(plan.mesh)
  return shards(sharding.spec_for((logical,), (dim,), mesh, rules), plan.mesh)


# ---------------------------------------------------------------------------
# Tensors from eval_shape


def param_shapes(cfg: model_lib.ModelConfig, sizes: dict[str, int]):
  """Parameter ShapeDtypeStructs carrying their TRAIN_RULES shardings."""
  mesh = abstract_mesh(sizes)
  return checkpoint.abstract_params(cfg, mesh, sharding.TRAIN_RULES)[2]


def trainable_params(params: dict) -> dict:
  """The parameters the update step differentiates and the optimizer holds:
  the LoRA adapters when there are any (``lora.partition``), else all."""
  layers = params["layers"]
  adapters = {k: v for k, v in layers.items() if "_lora_" in k}
  return {"layers": adapters} if adapters else params


def tree_bytes(tree, sizes: dict[str, int]) -> tuple[int, float]:
  """(total bytes, bytes per device) of sharded ShapeDtypeStructs."""
  total = per_device = 0
  for x in jax.tree.leaves(tree):
    total += _nbytes(x)
    per_device += _nbytes(x) / shards(x.sharding.spec, sizes)
  return total, per_device


def opt_state(params):
  """AdamW state (update.optimizer) with each moment sharded like its
  parameter (update.opt_shardings)."""
  tx = update.optimizer(update.OptimConfig())
  state = jax.eval_shape(tx.init, params)
  shard = update.opt_shardings(params, tx)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    state,
    shard,
  )


def kv_cache_bytes(plan: Plan) -> tuple[int, float]:
  """K and V [NL, B, K, S, H] in the cache dtype, SAMPLE_RULES layout.

  With ``sampler.slots`` = n < B (the refilling sampler) the cache has n
  rows, plus the P prompts' prefilled [NL, P, K, T, H] that refills copy.
  """
  cfg = plan.model
  rows, seq = plan.sample_rows, plan.prompt_bucket + plan.new_tokens
  parts = [(rows, seq)]
  if 0 < plan.sampler_slots < rows:
    prompts = rows // plan.generations
    parts = [(plan.sampler_slots, seq), (prompts, plan.prompt_bucket)]
  total = per_device = 0
  nbytes = model_lib.DTYPES[plan.cache_dtype](0).nbytes
  for b, s in parts:
    shape = (cfg.num_layers, b, cfg.num_kv_heads, s, cfg.head_dim)
    spec = sharding.spec_for(
      model_lib.CACHE_AXES, shape, abstract_mesh(plan.mesh),
      sharding.SAMPLE_RULES,
    )  # fmt: skip
    size = 2 * math.prod(shape) * nbytes
    total += size
    per_device += size / shards(spec, plan.mesh)
  return total, per_device


# ---------------------------------------------------------------------------
# Activations of the update step (formula)


def activation_bytes(plan: Plan, remat: str | None = None) -> dict[str, float]:
  """Per-device activation bytes of one micro-batch's forward + backward.

  Returns ``layer`` (saved per decoder layer), ``working`` (one layer's full
  set, recomputed during the backward pass under remat), ``head`` (hidden
  states and the [b, C, V] float32 log-prob chunk) and ``total``.
  """
  cfg, rules = plan.model, sharding.TRAIN_RULES
  remat = cfg.remat if remat is None else remat
  e = model_lib.DTYPES[cfg.dtype](0).nbytes
  d, n, k, h, f = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads,
                   cfg.head_dim, cfg.d_ff)  # fmt: skip
  b = plan.micro_rows
  r = b / _factor("batch", b, plan, rules)
  tn = _factor("act_heads", n, plan, rules)
  tk = _factor("act_kv_heads", k, plan, rules)
  tf = _factor("act_mlp", f, plan, rules)
  tv = _factor("act_vocab", cfg.vocab_size, plan, rules)
  s = plan.row_tokens
  tok = r * s
  full = (
    tok * e * (C_D * d + C_Q * n * h / tn + C_K * k * h / tk + C_F * f / tf)
  )
  if cfg.attention == "xla":  # the [N, S, S] probabilities, fp32 + dtype
    full += r * (n / tn) * s * s * (4 + e)
  else:  # fused kernels: a float32 log-sum-exp and max per query and head
    full += r * (n / tn) * s * 8
  saved = {
    "none": full,
    "dots": tok * e * (3 * d + n * h / tn + 2 * k * h / tk + 2 * f / tf),
    "full": tok * e * 1.5 * d,
  }[remat]
  # The backward pass of one layer holds about one layer's full set of
  # residuals and their cotangents; dots recomputes only the elementwise
  # part. Under full remat the recomputed layer's backward holds about 3/4
  # of it in the compiled step (fitted to ``compiled_memory``, like the C_*
  # constants).
  working = {"none": full, "dots": full / 2, "full": 0.75 * full}[remat]
  c = min(plan.chunk, plan.new_tokens)
  head = r * c * cfg.vocab_size / tv * 4 * (1 + _support_chunks(plan.support))
  head += 3 * tok * d * e
  total = cfg.num_layers * saved + working + head
  return {"layer": saved, "working": working, "head": head, "total": total}


def _support_chunks(support: support_lib.Support) -> float:
  """Extra [b, C, V] float32 arrays the update's log-prob chunk holds for a
  truncated support (the sort and cumulative sums of
  ``support.support_mask``).
  Fitted to ``compiled_memory`` at C = 16 (top-p 5.0, top-k 2.0, both 7.0);
  at C = 64 XLA reuses more of them (3.0, 0.25, 4.0), so this is an upper
  estimate."""
  return 5.0 * (support.top_p < 1.0) + 2.0 * bool(support.top_k)


def compiled_memory(plan: Plan):
  """``memory_analysis()`` of ``update.update_step`` compiled for the plan's
  shapes on one local device (the mesh is ignored): the measured check of
  the formula, for small configs."""
  graphdef, state = nnx.split(model_lib.abstract_model(plan.model), nnx.Param)
  tx = update.optimizer(update.OptimConfig())
  sds = jax.ShapeDtypeStruct
  i32 = lambda *shape: sds(shape, jnp.int32)
  f32 = lambda *shape: sds(shape, jnp.float32)
  b, s = plan.rows, plan.prompt_bucket + plan.new_tokens
  trainable, _ = lora.partition(state)
  ts = update.TrainState(
    i32(), state, jax.eval_shape(tx.init, trainable), i32()
  )
  batch = update.UpdateBatch(
    i32(b, s), i32(b, s), sds((b, s), bool), sds((b, plan.new_tokens), bool),
    f32(b, plan.new_tokens), f32(b), sds((b,), bool),
  )  # fmt: skip
  ucfg = update.UpdateConfig(
    micro_batches=plan.micro_batches,
    logprob_chunk=plan.chunk,
    support=plan.support,
  )
  lowered = update.update_step.lower(graphdef, ts, batch, tx=tx, cfg=ucfg)
  return lowered.compile().memory_analysis()


def update_temps(plan: Plan) -> float:
  """Formula counterpart of the compiled step's ``temp_size_in_bytes``."""
  est = estimate(plan)
  act = est[f"activations remat={plan.model.remat}"][1]
  return est["gradients"][1] + act


# ---------------------------------------------------------------------------
# The plan


def estimate(plan: Plan) -> dict[str, tuple[float, float]]:
  """name → (total bytes, bytes per device) of every memory component."""
  params = param_shapes(plan.model, plan.mesh)
  p_total, p_dev = tree_bytes(params, plan.mesh)
  # Gradients and moments exist for the trainable parameters only: the
  # adapters under LoRA. The optimizer step updates the donated state in
  # place (``update._apply``: no temporaries of the parameters' size).
  trainable = trainable_params(params)
  t_total, t_dev = tree_bytes(trainable, plan.mesh)
  o_total, o_dev = tree_bytes(opt_state(trainable), plan.mesh)
  grad_copies = 2 if plan.micro_rows < plan.rows else 1  # + accumulator
  out = {
    "params": (p_total, p_dev),
    "optimizer state": (o_total, o_dev),
    "gradients": (grad_copies * t_total, grad_copies * t_dev),
    "kv cache (sampling)": kv_cache_bytes(plan),
  }
  # Decode reads weights in the sampling layout (replicated over the batch
  # axes). XLA gathers them a layer at a time inside the unrolled decode
  # step (two layers in flight) plus the LM head, in the compute dtype, not
  # a whole copy of the model: checked against the TPU compiler's memory of
  # the sampler (tools/aot.py, BENCHMARKS.md: within 15 % at the paper
  # shapes, where a whole copy overstated the sampling peak by 58 %).
  cd = jnp.dtype(model_lib.DTYPES[plan.model.dtype]).itemsize
  layer = sum(
    math.prod(shape) for shape, _, _ in
    model_lib.layer_param_specs(plan.model).values()
  )  # fmt: skip
  head = plan.model.vocab_size * plan.model.d_model
  gathered = (2 * layer + head) * cd / plan.mesh["tensor"]
  out["weights gathered for decode"] = (gathered, gathered)
  # The sampler casts the matrices to the compute dtype once, before its
  # decode loop (sampler._sample): a second, sharded copy when the master
  # weights are wider (norm vectors, a rounding error, are counted too).
  pd = jnp.dtype(model_lib.DTYPES[plan.model.param_dtype]).itemsize
  cast = cd / pd if pd > cd else 0.0
  out["weights in compute dtype (sampling)"] = (p_total * cast, p_dev * cast)
  for remat in ("none", "full", "dots"):
    act = activation_bytes(plan, remat)["total"]
    out[f"activations remat={remat}"] = (act * plan.devices, act)
  return out


def peaks(plan: Plan, est) -> dict[str, float]:
  """Per-device peak of the sampling phase and the update phase."""
  dev = {k: v[1] for k, v in est.items()}
  state = dev["params"] + dev["optimizer state"]
  act = dev[f"activations remat={plan.model.remat}"]
  return {
    "sampling": state + dev["kv cache (sampling)"]
    + dev["weights gathered for decode"]
    + dev["weights in compute dtype (sampling)"],
    "update": state + dev["gradients"] + act,
  }  # fmt: skip


def format_report(plan: Plan, device_gb: float) -> str:
  est = estimate(plan)
  mesh = ", ".join(f"{k}={v}" for k, v in plan.mesh.items())
  lines = [
    f"model {plan.model.num_layers}L d={plan.model.d_model} "
    f"params={model_lib.param_count(plan.model):,} "
    f"param_dtype={plan.model.param_dtype} dtype={plan.model.dtype} "
    f"remat={plan.model.remat} attention={plan.model.attention}"
    + (f" lora_rank={plan.model.lora_rank}" if plan.model.lora_rank else ""),
    f"mesh {mesh} ({plan.devices} devices); batch P={plan.prompts} "
    f"G={plan.generations} B={plan.rows} M={plan.micro_batches} "
    f"T={plan.prompt_bucket} L={plan.new_tokens}"
    + (
      f" micro_batch_tokens={plan.micro_batch_tokens} (largest micro-batch "
      f"{plan.micro_rows} rows at L)"
      if plan.micro_batch_tokens and not plan.pack
      else ""
    )
    + (
      f" pack_completions (largest micro-batch {plan.micro_rows} rows of "
      f"T + G·L = {plan.row_tokens})"
      if plan.pack
      else ""
    ),
    "",
    f"{'component':<30} {'total GiB':>11} {'per device GiB':>15}",
  ]
  for name, (total, dev) in est.items():
    lines.append(f"{name:<30} {total / GiB:>11.2f} {dev / GiB:>15.2f}")
  pk = peaks(plan, est)
  lines.append("")
  for phase, v in pk.items():
    lines.append(f"peak {phase:<25} {'':>11} {v / GiB:>15.2f}")
  phase = max(pk, key=pk.get)
  worst = pk[phase] / GiB
  verdict = "FITS" if worst <= 0.9 * device_gb else (
    "TIGHT" if worst <= device_gb else "DOES NOT FIT")  # fmt: skip
  lines.append(
    f"verdict: {verdict}: {phase} peak {worst:.1f} GiB per device of "
    f"{device_gb:g} "
    f"GiB ({100 * worst / device_gb:.0f} %; FITS means under 90 %)"
  )
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Config → Plan


def run_config(c) -> config.RunConfig:
  """The typed run config of a ``ConfigDict`` (or a ``RunConfig``)."""
  if isinstance(c, config.RunConfig):
    return c
  return config.RunConfig.from_dict(c.to_dict())


def model_config(c) -> model_lib.ModelConfig:
  """Shapes of the config's model: its arch (path=random) or its
  ``model.arch_name``."""
  m = run_config(c).model
  over = dict(
    **m.overrides,
    lora_rank=m.lora_rank,
    lora_alpha=m.lora_alpha,
    lora_targets=m.lora_targets,
  )
  if m.path == sources.RANDOM and m.arch:
    return model_lib.ModelConfig(**{**dict(m.arch), **over})
  name = m.arch_name or sources.arch_name(m.path)
  if not name:
    raise ValueError(
      "config.model.arch_name is required to size a model without loading it "
      f"(known: {sorted(model_lib.ARCHS)})"
    )
  return model_lib.named_arch(name, **over)


def plan_from_config(c, mesh=None, num_devices=None) -> Plan:
  run = run_config(c)
  d = run.data
  return Plan(
    model=model_config(run),
    mesh=mesh_sizes(tuple(mesh or run.mesh.shape), num_devices),
    prompts=d.prompts_per_step,
    generations=run.rl.num_generations,
    # The data pipeline's bucket (min_bucket·2^n, capped at max_prompt_len).
    prompt_bucket=data.bucket_length(
      d.max_prompt_len, d.min_bucket, d.max_prompt_len
    ),
    new_tokens=run.sampler.max_new_tokens,
    micro_batches=run.rl.micro_batches,
    micro_batch_tokens=run.rl.micro_batch_tokens,
    pack=run.rl.pack_completions,
    chunk=run.rl.logprob_chunk,
    cache_dtype=run.sampler.cache_dtype,
    sample_chunk=run.rl.sample_chunk,
    sampler_slots=run.sampler.slots,
    support=run.sampling.support,
  )


def host_memory_gb() -> float:
  """This host's physical memory in GiB (what a CPU run has)."""
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB


def device_gb_from_file(path: str) -> float | None:
  """Device memory named in the config file's mesh lines (e.g. 'v5p')."""
  try:
    with open(path) as fh:
      text = "\n".join(ln for ln in fh if "mesh" in ln.lower())
  except OSError:
    return None
  for name, gb in DEVICE_GB.items():
    if re.search(rf"\b{name}\b", text, re.IGNORECASE):
      return gb
  return None
