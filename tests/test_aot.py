"""Ahead-of-time compilation for TPU topologies and H100 hosts from this
CPU host (multians_jax/aot/step.py, aot_target.py, tools/aot.py) and the
trip-count-aware HLO cost model (multians_jax/aot/hlo_cost.py).

The TPU tests compile real TPU executables (libtpu, compile-only devices
of a named topology): a small model with real head sizes (head_dim 128),
both attention backends that target TPU, the splash kernel as a Mosaic
custom call under shard_map. The GPU tests compile for compile-only H100s
(the CUDA plugin and cuDNN, no GPU): cuDNN's fused attention as the
library call, forward and backward, sharded over the GPUs.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multians_jax.aot import hlo_cost
from multians_jax.aot import step as aot
from multians_jax.aot import target as aot_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
  import libtpu  # noqa: F401

  HAVE_TPU_COMPILER = True
except ImportError:  # the `test` extra installs it; keep a clear skip
  HAVE_TPU_COMPILER = False

needs_libtpu = pytest.mark.skipif(
  not HAVE_TPU_COMPILER, reason="libtpu (jax[tpu]) not installed"
)
try:
  import jax_cuda12_plugin  # noqa: F401

  HAVE_GPU_COMPILER = True
except ImportError:  # the `aot` extra installs it
  HAVE_GPU_COMPILER = False

needs_cuda_plugin = pytest.mark.skipif(
  not HAVE_GPU_COMPILER, reason="jax-cuda12-plugin (the aot extra) missing"
)


# ---------------------------------------------------------------------------
# hlo_cost: trip counts and the per-instruction model


def _scan(x, w, n):
  def body(c, _):
    return jnp.tanh(c @ w), None

  return jax.lax.scan(body, x, None, length=n)[0]


@pytest.mark.parametrize("n", [1, 7])
def test_scan_flops_are_trip_count_times_the_body(n):
  x, w = jnp.ones((64, 256)), jnp.ones((256, 256))
  compiled = jax.jit(_scan, static_argnums=2).lower(x, w, n).compile()
  cost = hlo_cost.analyze(compiled.as_text())
  assert cost.flops == pytest.approx(n * 2 * 64 * 256 * 256)
  if n > 1:  # XLA's own count stops at one body
    assert compiled.cost_analysis()["flops"] < cost.flops / 2
    assert [trips for _, trips, _ in cost.loops] == [n]


def test_nested_loops_multiply():
  def f(x, w):
    def outer(c, _):
      return _scan(c, w, 3), None

    return jax.lax.scan(outer, x, None, length=5)[0]

  x, w = jnp.ones((32, 128)), jnp.ones((128, 128))
  cost = hlo_cost.analyze(jax.jit(f).lower(x, w).compile().as_text())
  assert cost.flops == pytest.approx(15 * 2 * 32 * 128 * 128)


def test_loop_free_program_matches_xla_cost_analysis():
  def f(x, w, v):
    return jnp.tanh(x @ w) @ v + 1.0

  x, w = jnp.ones((128, 512)), jnp.ones((512, 512))
  compiled = jax.jit(f).lower(x, w, w).compile()
  ca = compiled.cost_analysis()
  cost = hlo_cost.analyze(compiled.as_text())
  assert cost.flops == pytest.approx(2 * 2 * 128 * 512 * 512)
  assert cost.flops == pytest.approx(ca["flops"], rel=0.01)  # + tanh, add
  assert cost.bytes_accessed == pytest.approx(ca["bytes accessed"], rel=0.1)


def test_a_counter_stepping_by_two_halves_the_trips():
  """Windowed collective matmuls count their loop up by 2 (TPU)."""

  def f(x, w):
    body = lambda c: (c[0] + 2, jnp.tanh(c[1] @ w))
    return jax.lax.while_loop(lambda c: c[0] < 8, body, (0, x))[1]

  x, w = jnp.ones((16, 64)), jnp.ones((64, 64))
  cost = hlo_cost.analyze(jax.jit(f).lower(x, w).compile().as_text())
  assert cost.flops == pytest.approx(4 * 2 * 16 * 64 * 64)


def test_data_dependent_loop_takes_the_given_bound():
  def f(x, w):
    cond = lambda c: jnp.sum(c[0]) < 1e30
    body = lambda c: (jnp.tanh(c[0] @ w), c[1])
    return jax.lax.while_loop(cond, body, (x, 0))[0]

  x, w = jnp.ones((16, 64)), jnp.ones((64, 64))
  text = jax.jit(f).lower(x, w).compile().as_text()
  once = hlo_cost.analyze(text)
  assert once.unbounded and once.flops == pytest.approx(2 * 16 * 64 * 64)
  bounded = hlo_cost.analyze(text, bounds={"": 9})
  assert not bounded.unbounded
  assert bounded.flops == pytest.approx(9 * 2 * 16 * 64 * 64)


def test_an_instruction_spanning_lines_stays_in_its_computation():
  """A Mosaic kernel's backend_config holds newlines; a continuation line
  starting with '}}' must not end the computation around it."""
  hlo = "\n".join([
    "HloModule m",
    "",
    "ENTRY %main (p: f32[8,16], w: f32[16,4]) -> f32[8,4] {",
    "  %p = f32[8,16]{1,0} parameter(0)",
    "  %w = f32[16,4]{1,0} parameter(1)",
    '  %k = f32[8,16]{1,0} custom-call(%p), custom_call_target='
    '"tpu_custom_call", backend_config={"meta":"{\\"a\\": 1,',
    '}}, metadata={op_name="kernel"}',
    "  ROOT %d = f32[8,4]{1,0} dot(%k, %w), lhs_contracting_dims={1}, "
    "rhs_contracting_dims={0}",
    "}",
  ])  # fmt: skip
  cost = hlo_cost.analyze(hlo)
  assert cost.flops == 2 * 8 * 4 * 16 and cost.mosaic_calls == 1


def test_slices_of_a_stacked_operand_count_as_the_slice():
  """A layer scan reads one layer of its stacked weights per step, not the
  whole stack: bytes grow with the layer count, not with its square."""

  def f(x, ws):
    def body(c, w):
      return jnp.tanh(c @ w), None

    return jax.lax.scan(body, x, ws)[0]

  x = jnp.ones((8, 256))
  per = []
  for n in (4, 32):
    ws = jnp.ones((n, 256, 256))
    text = jax.jit(f).lower(x, ws).compile().as_text()
    per.append(hlo_cost.analyze(text).bytes_accessed / n)
  assert per[1] == pytest.approx(per[0], rel=0.25)
  # a few reads of one layer's weights per step (slice, then the dot), far
  # from the whole stack's 32
  assert per[1] < 4 * 256 * 256 * 4


# ---------------------------------------------------------------------------
# Targets and meshes


def test_bad_topology_names_the_problem():
  with pytest.raises(aot_target.AotError, match="GENERATION:SHAPE"):
    aot_target.target("v5p")
  with pytest.raises(aot_target.AotError, match="unknown TPU generation or"):
    aot_target.target("v9z:2x2")
  for bad in ("h100:eight", "h100:0", "h100:2x0", "h100:2x2x2"):
    with pytest.raises(aot_target.AotError, match="h100:2x8"):
      aot_target.target(bad)


@needs_libtpu
def test_child_processes_do_not_inherit_libtpu_variables():
  """libtpu sets CLOUD_TPU_TASK_ID & co. in the C environment when it loads
  off a TPU VM; a training process started after a compile would take
  itself for a pod worker."""
  aot_target.target("v5e:2x2")
  code = "import os; print(sorted(k for k in os.environ if 'TPU' in k))"
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, check=True
  ).stdout
  for key in ("CLOUD_TPU_TASK_ID", "TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES"):
    if key not in os.environ:
      assert key not in out, out


def _tiny(**over):
  from configs import tiny

  c = tiny.get_config()
  c.model.arch.update(d_model=256, num_heads=4, num_kv_heads=2,
                      head_dim=128, d_ff=512, vocab_size=1024)  # fmt: skip
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.rl.micro_batches = 4
  for k, v in over.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


@needs_libtpu
@needs_cuda_plugin
def test_a_kernel_the_target_cannot_run_is_refused():
  """splash is a TPU kernel and cudnn a GPU one with no float32 kernel:
  each elsewhere would compile a slow fallback without a word."""
  cases = [
    ("h100:1", {"model.attention": "splash"}, "TPU kernel"),
    ("v5e:2x2", {"model.attention": "cudnn"}, "cuDNN's GPU kernel"),
    ("h100:1", {"model.attention": "cudnn"}, "16-bit compute dtype"),
  ]
  for topology, over, msg in cases:
    with pytest.raises(aot_target.AotError, match=msg):
      aot.run_aot(_tiny(**over), topology)


@needs_libtpu
def test_mesh_that_does_not_tile_the_topology_is_refused():
  c = _tiny(**{"mesh.fsdp": 3})
  with pytest.raises(aot_target.AotError, match="does not tile v5e:2x2"):
    aot.run_aot(c, "v5e:2x2")


# ---------------------------------------------------------------------------
# Real TPU executables


def _check_stage(s):
  assert "error" not in s, s.get("error")
  assert s["fits"] and s["peak_bytes_per_chip"] > 0
  # (a decode step of one row per chip may have no dot at all: XLA turns
  # a tiny matrix-vector product into multiply + reduce)
  assert s["flops_per_chip"] >= 0 and s["bytes_accessed_per_chip"] > 0
  assert s["roofline_seconds"] > 0


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize(
  "attention, over",
  [
    ("xla", {}),
    ("splash", {"model.lora_rank": 4, "sampler.slots": 4}),
    ("splash", {"rl.share_prompt": False}),
    ("xla", {"loss.kl_beta": 0.05, "warmup.steps": 2}),
  ],
  ids=["xla-shared", "splash-lora-refilled", "splash-per-row", "xla-kl-warmup"],
)
def test_every_stage_compiles_for_v5e(attention, over):
  c = _tiny(**{"model.attention": attention, **over})
  res = aot.run_aot(c, "v5e:2x2", progress=lambda m: None)
  assert res["chips"] == 4 and res["chip"] == "v5e"
  extra = {"logprobs", "warmup"} if "warmup.steps" in over else set()
  assert set(res["stages"]) == {"prefill", "decode", "update"} | extra
  for s in res["stages"].values():
    _check_stage(s)
  up = res["stages"]["update"]
  # the layer scan (2 layers) and the micro-batch loop (the 3 after the
  # first): trip counts read from the compiled loops, not counted once
  trips = {n for _, n, how in up["loops"] if how != "bound given"}
  assert {2, 3} <= trips, up["loops"]
  dec = res["stages"]["decode"]
  assert dec["step_bytes_per_chip"] > 0
  assert res["stages"]["prefill"]["flops_per_chip"] > 0 < up["flops_per_chip"]
  for s in res["stages"].values():
    splash = [k for k in s["mosaic_kernels"] if k.startswith("splash")]
    # the real Mosaic kernel, not the interpreter's plain ops
    assert bool(splash) == (attention == "splash"), s["mosaic_kernels"]
  if attention == "splash":  # the kernel's FLOPs counted (hlo_cost)
    assert res["stages"]["prefill"]["flops_per_chip"] > 0
  assert res["fits"]


@needs_libtpu
@pytest.mark.slow
def test_update_compiles_for_a_multi_host_topology():
  c = _tiny(**{"model.attention": "splash", "data.prompts_per_step": 4})
  res = aot.run_aot(c, "v5p:2x2x2", stages=["update"], progress=lambda m: None)
  assert res["hosts"] > 1 and res["chips"] == 8
  _check_stage(res["stages"]["update"])


def _oversized_update(topology, out, *flags):
  """tools/aot.py on the update of a 4.8 B-parameter model (head_dim 128)
  with full fine-tuning, in its own process."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  arch = dict(head_dim=128, d_model=4096, num_heads=32, num_kv_heads=8,
              d_ff=12288, num_layers=24, vocab_size=32000)  # fmt: skip
  return subprocess.run(
    [
      sys.executable, "tools/aot.py", "--config=configs/tiny.py",
      f"--topology={topology}", "--stages=update", f"--out={out}", *flags,
      *(f"--config.model.arch.{k}={v}" for k, v in arch.items()),
    ],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
  )  # fmt: skip


@needs_libtpu
@pytest.mark.slow
def test_cli_exits_1_naming_the_stage_and_bytes(tmp_path):
  """Full fine-tuning of a 4.8 B-parameter model (fp32 weights and Adam
  moments: 16 bytes a parameter) on 4 v5e chips of 16 GiB: the TPU
  compiler refuses the update, and the CLI says so with the bytes."""
  res = _oversized_update("v5e:2x2", tmp_path, "--config.mesh.fsdp=-1")
  assert res.returncode == 1, res.stdout + res.stderr
  assert "DOES NOT FIT" in res.stdout
  assert "update needs" in res.stdout and "GiB of temporaries" in res.stdout
  data = json.loads((tmp_path / "aot.json").read_text())
  up = data["stages"]["update"]
  assert not up["fits"] and not data["fits"]
  assert up["temp_bytes"] > up["compiler_hbm_bytes"] > 15 * 2**30
  assert "micro_batches" in up["advice"]


@needs_libtpu
def test_splash_kernel_flops_are_counted():
  """The splash kernels are Mosaic calls XLA reports no FLOPs for: counted
  from their query and key operands, forward as its two [T,S,H] products,
  the gradient as forward (2) + dq (3) + dkv (4)."""
  from multians_jax import sharding
  from multians_jax.model import attention

  b, t, n, kv, h = 2, 256, 4, 2, 128
  dev = aot_target.target("v5e:2x2").devices[0]
  mesh = jax.sharding.Mesh(np.array([dev]).reshape(1, 1, 1), sharding.MESH_AXES)
  one = jax.sharding.SingleDeviceSharding(dev)
  # float32: Mosaic rejects bfloat16 operands at the "highest" matmul
  # precision this suite sets (conftest.py); the count does not depend on it
  q = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32, sharding=one)
  k = jax.ShapeDtypeStruct((b, kv, t, h), jnp.float32, sharding=one)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=one)

  def f(q, k, v, seg):
    return attention.splash(q, k, v, seg, seg, jnp.float32).sum()

  bnth = b * n * t * t * h
  for fn, products in ((f, 2), (jax.grad(f, argnums=(0, 1, 2)), 2 + 3 + 4)):
    with sharding.activate(mesh, sharding.TRAIN_RULES):
      text = jax.jit(fn).lower(q, k, k, seg).compile().as_text()
    cost = hlo_cost.analyze(text)
    assert cost.mosaic_calls >= 1
    assert cost.flops == pytest.approx(2 * products * bnth, rel=0.05)


# ---------------------------------------------------------------------------
# Splash under shard_map on a CPU mesh (interpret mode): same numbers


@pytest.mark.slow
def test_splash_under_a_sharded_mesh_equals_xla():
  from multians_jax import sharding
  from multians_jax.model import attention

  mesh = sharding.make_mesh(2, 2, 2)
  rng = np.random.default_rng(0)
  b, t, n, kv, h = 8, 20, 4, 2, 16
  q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, kv, t, h)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, kv, t, h)), jnp.float32)
  mask = jnp.asarray(np.arange(t)[None] >= rng.integers(0, 5, (b, 1)))
  allowed = mask[:, None, :] & jnp.tril(jnp.ones((t, t), bool))[None]
  want = attention.dense(q, k, v, allowed, jnp.float32)
  with sharding.activate(mesh, sharding.TRAIN_RULES):
    got = jax.jit(
      lambda q, k, v, m: attention.splash(q, k, v, m, m, jnp.float32)
    )(q, k, v, mask)
  keep = np.asarray(mask)[:, :, None, None]
  np.testing.assert_allclose(
    np.where(keep, got, 0), np.where(keep, want, 0), atol=1e-5
  )


# ---------------------------------------------------------------------------
# H100 executables (the CUDA plugin, compile-only devices)


def _attention_flops(impl, grad):
  """hlo_cost's FLOPs of one attention call compiled for an H100."""
  b, t, n, kv, h = 2, 256, 4, 2, 128
  (dev,) = aot_target.target("h100:1").devices
  one = jax.sharding.SingleDeviceSharding(dev)
  q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16, sharding=one)
  k = jax.ShapeDtypeStruct((b, t, kv, h), jnp.bfloat16, sharding=one)
  mask = jax.ShapeDtypeStruct((b, 1, t, t), jnp.bool_, sharding=one)

  def f(q, k, v, m):
    o = jax.nn.dot_product_attention(q, k, v, mask=m, implementation=impl)
    return o.astype(jnp.float32).sum()

  fn = jax.grad(f, argnums=(0, 1, 2)) if grad else f
  text = jax.jit(fn).lower(q, k, k, mask).compile().as_text()
  return hlo_cost.analyze(text), b * n * t * t * h


@needs_cuda_plugin
def test_cudnn_attention_flops_are_counted():
  """cuDNN's fused attention is a library call whose FLOPs XLA does not
  report: counted from its shapes, forward as the two products the XLA
  implementation's dots are (Q·Kᵀ, P·V), backward as five."""
  fwd, bnth = _attention_flops("cudnn", grad=False)
  assert fwd.flops == pytest.approx(4 * bnth)
  ref, _ = _attention_flops("xla", grad=False)
  assert ref.flops == pytest.approx(fwd.flops, rel=0.01)
  both, _ = _attention_flops("cudnn", grad=True)
  assert both.flops == pytest.approx((4 + 10) * bnth)


@needs_cuda_plugin
@pytest.mark.slow
@pytest.mark.parametrize(
  "over",
  [{}, {"rl.share_prompt": False, "model.lora_rank": 4, "sampler.slots": 4}],
  ids=["shared", "per-row-lora-refilled"],
)
def test_every_stage_compiles_for_h100s(over):
  """cuDNN's kernel, not its XLA fallback, where it is used: the training
  forward and backward and the prefill (a decode step runs ``dense``)."""
  c = _tiny(**{"model.attention": "cudnn", "model.dtype": "bfloat16", **over})
  res = aot.run_aot(c, "h100:2", progress=lambda m: None)
  assert (res["chips"], res["chip"], res["platform"]) == (2, "h100", "gpu")
  assert res["hbm_budget_bytes_per_chip"] == int(0.75 * 80e9)
  assert set(res["stages"]) == {"prefill", "decode", "update"}
  for s in res["stages"].values():
    _check_stage(s)

  def fmha(stage, backward):
    calls = res["stages"][stage]["library_calls"]
    return sum(
      n for k, n in calls.items()
      if k.startswith("__cudnn$fmha") and ("Backward" in k) == backward
    )  # fmt: skip

  assert fmha("update", False) >= 2 and fmha("update", True) >= 2  # 2 layers
  assert fmha("prefill", False) >= 2
  assert res["fits"]


@needs_cuda_plugin
@pytest.mark.slow
def test_gpu_fit_is_judged_against_what_jax_allocates(tmp_path):
  """The GPU compiler does not refuse an oversized program: the verdict
  compares its peak with the share of the GPU's memory JAX preallocates
  (75 %), and names it."""
  res = _oversized_update(
    "h100:1", tmp_path, "--config.model.dtype=bfloat16",
    "--config.model.attention=cudnn",
  )  # fmt: skip
  assert res.returncode == 1, res.stdout + res.stderr
  up = json.loads((tmp_path / "aot.json").read_text())["stages"]["update"]
  assert not up["fits"] and up["peak_bytes_per_chip"] > 0.75 * 80e9
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION" in up["advice"]
  assert "update needs" in res.stdout and "DOES NOT FIT" in res.stdout


@needs_cuda_plugin
def test_decode_loop_reads_matrices_in_the_compute_dtype():
  """float32 master weights with bfloat16 compute, compiled for an H100:
  the matrices are cast once before the decode loop, so no step reads (or,
  sharded, gathers) a float32 matrix. (XLA:CPU sinks the cast back into
  its loops; the GPU compiler keeps it where it is written.)"""
  from flax import nnx

  from multians_jax.model import sampler
  from multians_jax.model import transformer as model

  d, ff = 64, 96  # shapes no activation has: [.., 64, 96] is an MLP matrix
  cfg = model.ModelConfig(
    "qwen3", 101, d, 2, 4, 2, 16, ff, max_seq_len=64, pad_token_id=0,
    param_dtype="float32", dtype="bfloat16",
  )  # fmt: skip
  graphdef, state = nnx.split(model.abstract_model(cfg))
  (dev,) = aot_target.target("h100:1").devices
  one = jax.sharding.SingleDeviceSharding(dev)
  state = jax.tree.map(lambda x: x.update(sharding=one), state)
  scfg = sampler.SamplingConfig(8, temperature=1.0, stop_ids=(1,), pad_id=0)
  tok = jax.ShapeDtypeStruct((2, 16), jnp.int32, sharding=one)
  text = (
    jax.jit(sampler._sample, static_argnames=("cfg", "num_samples"))
    .lower(graphdef, state, tok, tok.update(dtype=jnp.bool_),
           tok.update(shape=(2,), dtype=jnp.uint32), cfg=scfg, num_samples=2)
    .compile().as_text()
  )  # fmt: skip
  prog = hlo_cost.Program(text)
  edges, _, loops = prog._call_graph()
  inside = prog._inside_loops(edges, loops)
  assert inside
  matrix = re.compile(rf"f32\[(\d+,)?({d},{ff}|{ff},{d})\]")
  for comp in inside:
    for inst in prog.comps[comp]:
      types = [inst.type] + [prog.types[comp].get(o, "") for o in inst.operands]
      assert not any(matrix.search(t) for t in types), (comp, inst.name)
