"""Compile-only devices for ``aot``: named TPU topologies (libtpu) and
hosts of H100 GPUs (the CUDA plugin), the chips' published figures, and
the run's mesh over them.

* TPU: ``v5p:2x2x4``, ``v5e:2x2``, ``v6e:8x8`` ... — libtpu describes the
  slice (chips, hosts, interconnect) from its name.
* GPU: ``h100:8`` (one host of 8 GPUs) or ``h100:2x8`` (2 hosts of 8) —
  the CUDA plugin builds the devices from a target description (XLA's
  ``TargetConfig`` text proto: the H100's SM count, shared memory,
  bandwidth, compute capability 9.0, the cuDNN and CUDA versions) instead
  of querying a local GPU. Needs ``jax-cuda12-plugin``/``-pjrt`` and, for
  ``model.attention=cudnn``, the cuDNN library (``pip install -e
  ".[aot]"``); no GPU, driver or CUDA toolkit. The compile stops before
  machine code (``generated_code_size`` is 0): the HLO passes, fusion,
  cuDNN graph building, the collectives and buffer assignment are the
  GPU compiler's own, so memory and cost are; whether every kernel
  assembles with ``ptxas`` is not checked.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import math
import os
import re

import jax
import numpy as np

from multians_jax import sharding
from multians_jax.aot import memory

GiB = memory.GiB


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures: dense bf16 peak FLOP/s, HBM bandwidth
  (bytes/s) and HBM capacity (bytes); ``usable``: the fraction of HBM a
  JAX process may allocate (GPUs: the allocator's preallocated share)."""

  name: str
  bf16_flops: float
  hbm_bandwidth: float
  hbm_bytes: int
  source: str
  platform: str = "tpu"
  usable: float = 1.0

  @property
  def budget_bytes(self) -> int:
    return int(self.hbm_bytes * self.usable)


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
    "h100", 989e12, 3350e9, 80 * 10**9, "nvidia.com/en-us/data-center/h100",
    platform="gpu",
  ),
}  # fmt: skip
TPUS = sorted(k for k, c in CHIPS.items() if c.platform == "tpu")
GPUS = sorted(k for k, c in CHIPS.items() if c.platform == "gpu")
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

# XLA's GPU target description of an H100 SXM (xla/tools/hlo_opt/gpu_specs/
# h100_sxm.txtpb: what CudaExecutor::CreateDeviceDescription reports on one),
# without the cuDNN and CUDA versions, added by _gpu_target_config.
_H100_DEVICE = """\
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84978434048
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
"""
_GPU_DEVICES = {"h100": _H100_DEVICE}
# The CUDA version jax-cuda12 wheels are built against (the cuDNN version
# is the installed library's: its graphs are built at compile time).
_CUDA_RUNTIME = (12, 8)


class AotError(Exception):
  """A stage that cannot be compiled for the target, or a bad target."""


@dataclasses.dataclass
class Target:
  topology: str
  devices: list
  chip: Chip
  hosts: int


def target(topology: str) -> Target:
  """Compile-only devices of a named TPU topology (``v5p:2x2x4``,
  ``v5e:2x2``, ``v6e:8x8`` ...) or GPU host(s) (``h100:8``,
  ``h100:2x8``)."""
  if ":" not in topology:
    raise AotError(
      f"--topology must be GENERATION:SHAPE, e.g. v5p:2x2x4, v5e:2x2 or "
      f"h100:8: {topology!r}"
    )
  gen, shape = topology.split(":", 1)
  gen = gen.lower()
  if gen in GPUS:
    return _gpu_target(topology, gen, shape)
  if gen not in TPUS:
    raise AotError(
      f"unknown TPU generation or GPU {gen!r} in {topology!r} (known: TPU "
      f"{TPUS}, GPU {GPUS})"
    )
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise AotError(
      'compiling for TPU needs libtpu: pip install -e ".[aot]" (jax[tpu])'
    ) from None
  # libtpu takes a machine-wide lock per process; compile-only use touches
  # no chip, so other processes (a CLI beside the tests) may load it too.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
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

  before = dict(os.environ)
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  finally:
    _restore_env(before)
  return list(topo.devices)


def _gpu_target(topology: str, gen: str, shape: str) -> Target:
  m = re.fullmatch(r"(?:(\d+)x)?(\d+)", shape)
  if not m or int(m.group(2)) < 1 or int(m.group(1) or 1) < 1:
    raise AotError(
      f"GPU topology must be {gen}:GPUS or {gen}:HOSTSxGPUS (GPUs per host), "
      f"e.g. {gen}:8 or {gen}:2x8: {topology!r}"
    )
  hosts, per_host = int(m.group(1) or 1), int(m.group(2))
  try:
    import jax_cuda12_plugin  # noqa: F401
  except ImportError:
    raise AotError(
      'compiling for GPUs needs the CUDA plugin: pip install -e ".[aot]" '
      "(jax-cuda12-plugin, jax-cuda12-pjrt, nvidia-cudnn-cu12)"
    ) from None
  # The plugin checks the local CUDA libraries against a GPU's driver at
  # load: there is neither on a compile host.
  os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
  try:
    devices = _cuda_devices(gen, hosts, per_host)
  except Exception as e:
    raise AotError(f"CUDA plugin refused {topology!r}: {e}") from e
  # JAX preallocates this share of a GPU's memory for its allocator (the
  # default 0.75): the budget a run's programs share.
  frac = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
  chip = dataclasses.replace(CHIPS[gen], usable=frac)
  return Target(topology, devices, chip, hosts)


def _cudnn_version() -> tuple[int, int]:
  try:
    v = importlib.metadata.version("nvidia-cudnn-cu12")
  except importlib.metadata.PackageNotFoundError:
    return (9, 8)  # the oldest the jax-cuda12 plugin accepts
  major, minor = v.split(".")[:2]
  return int(major), int(minor)


def gpu_target_config(gen: str) -> str:
  """XLA's ``TargetConfig`` text proto for ``gen`` with the installed
  cuDNN's version and the CUDA runtime the plugin is built for."""
  dnn, rt = _cudnn_version(), _CUDA_RUNTIME
  return (
    _GPU_DEVICES[gen]
    + f"dnn_version_info {{ major: {dnn[0]} minor: {dnn[1]} }}\n"
    + f"runtime_version {{ major: {rt[0]} minor: {rt[1]} }}\n"
  )


@functools.cache
def _cuda_devices(gen: str, hosts: int, per_host: int) -> list:
  from jax.experimental import topologies

  topo = topologies.get_topology_desc(
    platform="cuda",
    target_config=gpu_target_config(gen),
    topology=f"1x{hosts}x{per_host}",  # slices x hosts x GPUs per host
  )
  return list(topo.devices)


# Variables libtpu sets in the C environment (not in os.environ) when it
# loads off a TPU VM, with "WARNING: could not determine ..." as values.
# Child processes inherit them: `python -m multians_jax.main` would then
# take CLOUD_TPU_TASK_ID for a pod and call jax.distributed.initialize().
_LIBTPU_ENV = (
  "CLOUD_TPU_TASK_ID", "CLOUD_TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID",
  "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "TPU_PROCESS_BOUNDS",
  "TPU_CHIPS_PER_PROCESS_BOUNDS", "TPU_HOST_BOUNDS", "TPU_SKIP_MDS_QUERY",
  "TPU_LIBRARY_PATH",
)  # fmt: skip


def _restore_env(before: dict) -> None:
  """The process environment as it was before libtpu loaded (keeping
  ALLOW_MULTIPLE_LIBTPU_LOAD)."""
  for key in _LIBTPU_ENV:
    if key in before:
      os.environ[key] = before[key]  # putenv: the C environment too
    else:
      os.environ.pop(key, None)
      os.unsetenv(key)


def check_attention(model_cfg, tgt: Target) -> None:
  """Refuses an attention backend the target cannot run as the kernel it
  names (each would otherwise compile a slow fallback without a word)."""
  impl, platform = model_cfg.attention, tgt.chip.platform
  if impl == "splash" and platform != "tpu":
    raise AotError(
      "model.attention=splash is a TPU kernel (Pallas/Mosaic); on "
      f"{tgt.topology} it would compile Pallas' interpreter: use "
      "model.attention=cudnn (or xla)"
    )
  if impl == "cudnn" and platform != "gpu":
    raise AotError(
      f"model.attention=cudnn is cuDNN's GPU kernel; on {tgt.topology} it "
      "would compile its XLA fallback: use model.attention=splash (or xla)"
    )
  if impl == "cudnn" and model_cfg.dtype not in ("bfloat16", "float16"):
    raise AotError(
      f"model.attention=cudnn needs a 16-bit compute dtype (cuDNN has no "
      f"float32 attention kernel): model.dtype={model_cfg.dtype}; set "
      "--config.model.dtype=bfloat16"
    )


def make_mesh(run, tgt: Target):
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


def quiet_env() -> None:
  """Keeps libtpu and the CUDA plugin from looking for local chips (a CPU
  host compiles for named targets only)."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
