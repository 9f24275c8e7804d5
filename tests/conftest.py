"""Test set-up: 8 fake CPU devices (set before jax is imported), offline HF."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def one_device_mesh():
  from multians_jax import sharding

  return sharding.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
  """Drops jit caches after each test module. Every compiled CPU
  executable holds a few memory maps; a whole suite's worth in one process
  passes the kernel's vm.max_map_count (65,530) and LLVM aborts mid-compile."""
  yield
  import gc

  jax.clear_caches()
  gc.collect()
