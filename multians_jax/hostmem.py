"""Free host memory handed back to the operating system between phases.

A training step's host side (tokenising, scoring, batch assembly, the
runtime's own small buffers) frees memory that glibc's allocator keeps in
its arenas: resident, reusable by later small allocations but not by the
compiled programs' large temporaries, which are fresh mappings. On CPU,
where those temporaries live in the same memory, the kept pages add to the
peak of every phase: 0.35-0.4 GB in the demo's warm-up and evaluation
(BENCHMARKS.md, "Demo"). ``release()`` returns them (glibc's
``malloc_trim``) at the phase boundaries: before each update
(``update.rl_update``), warm-up step and evaluation;
``release_after_compiles()`` (armed by ``main``) also after every XLA
compilation, whose freed working memory (0.3 GB for the demo's update
program) would otherwise sit beside the program's first execution.
Elsewhere (another C library) they do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

import jax

# The event JAX records when a backend compilation has finished (before
# the program first runs); jax/_src/dispatch.py's BACKEND_COMPILE_EVENT.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_state = {"listening": False, "after_compile": 0}


@functools.cache
def _malloc_trim():
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc.malloc_trim
  except (OSError, AttributeError):  # not glibc
    return None


def release() -> bool:
  """Returns the free pages of every malloc arena to the OS; whether any
  were returned (False where the C library has no ``malloc_trim``)."""
  trim = _malloc_trim()
  return bool(trim is not None and trim(0))


def _on_duration(event: str, duration: float, **kwargs) -> None:
  if event == COMPILE_EVENT:
    _state["after_compile"] += 1
    release()


def release_after_compiles() -> None:
  """From now on, ``release()`` after every XLA compilation (registered
  once per process)."""
  if not _state["listening"]:
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    _state["listening"] = True


def resident_bytes() -> int:
  """This process's resident memory now (Linux: /proc/self/statm)."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
