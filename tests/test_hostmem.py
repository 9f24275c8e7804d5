"""hostmem.release: free heap pages go back to the OS."""

import ctypes.util

import numpy as np
import pytest

from multians_jax import hostmem


@pytest.mark.skipif(
  not ctypes.util.find_library("c") or hostmem._malloc_trim() is None,
  reason="glibc's malloc_trim is not available",
)
def test_release_returns_freed_heap_pages():
  """Small buffers freed in the middle of the heap stay resident (glibc
  trims only the heap's top by itself) until release() hands them back."""
  keep, drop = [], []
  for i in range(4000):  # 64 KiB each: heap, not mmap
    (keep if i % 2 else drop).append(np.ones(16 * 1024, np.float32))
  del drop  # 125 MiB freed between live buffers
  before = hostmem.resident_bytes()
  assert hostmem.release()
  freed = before - hostmem.resident_bytes()
  assert freed > 50 * 2**20, freed
  assert sum(float(x[0]) for x in keep) == 2000  # the live ones intact


def test_release_follows_every_compilation():
  """After release_after_compiles(), each XLA compilation (and only a
  compilation: a cached call is not one) triggers a release."""
  import jax
  import jax.numpy as jnp

  hostmem.release_after_compiles()
  hostmem.release_after_compiles()  # registered once
  f = jax.jit(lambda x: jnp.tanh(x) * 3.0 + 1.25)
  x = jax.block_until_ready(jnp.ones(7))
  before = hostmem._state["after_compile"]
  f(x)
  assert hostmem._state["after_compile"] == before + 1
  f(x)  # cached: no compilation
  assert hostmem._state["after_compile"] == before + 1
