"""Device mesh and logical-axis sharding rules.

Every parameter and constrained activation carries *logical* axis names
(``'embed'``, ``'mlp'``, ``'batch'`` …). One table per use (training,
sampling) maps them to the mesh axes ``('data', 'fsdp', 'tensor')``. This
module holds the only ``PartitionSpec`` literals of the project.

A logical axis whose mesh axes do not divide the dimension (e.g. 3 KV heads
on a 2-way ``tensor`` axis) falls back to fewer mesh axes, down to
replication, instead of failing: the same rules then serve every model size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class Rules:
  """A logical → mesh axis table. Unlisted logical names are replicated."""

  name: str
  table: tuple[tuple[str, MeshAxes], ...]

  def lookup(self, logical: str | None) -> tuple[str, ...]:
    if logical is None:
      return ()
    for key, value in self.table:
      if key == logical:
        if value is None:
          return ()
        return (value,) if isinstance(value, str) else tuple(value)
    return ()


# Training: parameters sharded over 'fsdp' on the model dim (ZeRO-3 style)
# and over 'tensor' on heads / mlp / vocab; the batch over data and fsdp.
TRAIN_RULES = Rules(
  "train",
  (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
  ),
)

# Sampling: weights replicated over the batch axes (no per-token all-gather
# of FSDP shards during decode), heads over 'tensor'.
SAMPLE_RULES = Rules(
  "sample", tuple(row for row in TRAIN_RULES.table if row[0] != "embed")
)

RULE_SETS = {"train": TRAIN_RULES, "sample": SAMPLE_RULES}


def fill_mesh(sizes: Sequence[int], num_devices: int | None) -> list[int]:
  """``(data, fsdp, tensor)`` sizes with at most one -1, filled so that the
  mesh spans ``num_devices`` (needed only when there is a -1)."""
  sizes = list(sizes)
  for name, size in zip(MESH_AXES, sizes, strict=True):
    if size == 0 or size < -1:
      raise ValueError(f"mesh.{name} must be a positive size or -1, got {size}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
  if -1 in sizes:
    if not num_devices:
      raise ValueError(
        f"mesh {sizes} has a -1 axis: the number of devices to fill it is "
        "needed (--num_devices)"
      )
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ValueError(
        f"{num_devices} devices cannot be split into mesh {sizes} (they do "
        "not fill it)"
      )
    sizes[sizes.index(-1)] = num_devices // known
  return sizes


def make_mesh(
  data: int = 1,
  fsdp: int = -1,
  tensor: int = 1,
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """Builds a ``(data, fsdp, tensor)`` mesh; one size may be -1 (= fill)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = fill_mesh((data, fsdp, tensor), len(devices))
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs "
      f"{math.prod(sizes)} devices, {len(devices)} available"
    )
  return jax.make_mesh(
    tuple(sizes),
    MESH_AXES,
    axis_types=(AxisType.Auto,) * 3,
    devices=devices,
  )


def spec_for(
  axes: Sequence[str | None],
  shape: Sequence[int],
  mesh: Mesh,
  rules: Rules,
) -> PartitionSpec:
  """Logical axis names + shape → ``PartitionSpec`` for ``mesh``.

  A mesh axis is used at most once; mesh axes that do not divide the
  dimension are dropped from the right until they do.
  """
  if len(axes) != len(shape):
    raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  out = []
  for logical, dim in zip(axes, shape, strict=True):
    cand = [a for a in rules.lookup(logical) if a not in used]
    while cand and dim % math.prod(mesh.shape[a] for a in cand):
      cand.pop()
    cand = [a for a in cand if mesh.shape[a] > 1]
    used.update(cand)
    out.append(None if not cand else cand[0] if len(cand) == 1 else tuple(cand))
  return PartitionSpec(*out)


def named(
  axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules
) -> NamedSharding:
  return NamedSharding(mesh, spec_for(axes, shape, mesh, rules))


# ---------------------------------------------------------------------------
# Activation constraints: active (mesh, rules) while tracing.

_ACTIVE = threading.local()


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Makes ``constrain`` use ``mesh`` and ``rules`` (also sets jax's mesh)."""
  prev = getattr(_ACTIVE, "value", None)
  _ACTIVE.value = (mesh, rules)
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _ACTIVE.value = prev


def active() -> tuple[Mesh, Rules] | None:
  return getattr(_ACTIVE, "value", None)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """``with_sharding_constraint`` by logical names; identity when inactive."""
  state = active()
  if state is None:
    return x
  mesh, rules = state
  if mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, named(axes, x.shape, mesh, rules))


def host_array(x: jax.Array) -> np.ndarray:
  """Gathers a (possibly sharded, multi-process) array to host numpy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


# ---------------------------------------------------------------------------
# Multi-process rows. Every process holds the same host batch (prompts,
# gold sets); device arrays are global. Host-side work on completions
# (decoding, reward matching) is split by rows: process i handles the rows
# ``bounds[i]:bounds[i + 1]`` of a batch-sharded global array, whole groups
# each, and the numeric results are gathered back in row order.


def row_bounds(num_groups: int, group: int = 1, count: int | None = None):
  """Row boundaries ([count + 1] ints) giving each process whole groups.

  Groups are spread as evenly as ``np.array_split`` does; process i owns
  rows ``bounds[i]:bounds[i + 1]`` of ``num_groups * group`` rows.
  """
  count = jax.process_count() if count is None else count
  return [group * (num_groups * i // count) for i in range(count + 1)]


def _rows_local(x: jax.Array, bounds) -> bool:
  """Whether every process's addressable shards hold its rows (full width).

  Decided from the global sharding alone, so every process agrees (the
  fallback in ``local_rows`` is a collective).
  """
  covered = [set() for _ in range(len(bounds) - 1)]
  n = x.shape[0]
  for dev, idx in x.sharding.devices_indices_map(x.shape).items():
    rest = zip(idx[1:], x.shape[1:], strict=True)
    full = all(s.indices(d) == (0, d, 1) for s, d in rest)
    if full and dev.process_index < len(covered):
      covered[dev.process_index].update(range(*idx[0].indices(n)[:2]))
  return all(
    set(range(bounds[i], bounds[i + 1])) <= covered[i]
    for i in range(len(covered))
  )


def local_rows(x: jax.Array, bounds) -> np.ndarray:
  """This process's rows ``bounds[i]:bounds[i+1]`` of a global array.

  Read from the addressable shards (replicas deduplicated) when they hold
  those rows, which is the case when the batch is sharded process-major
  over the mesh; otherwise all-gathered (a collective: every process calls
  this with the same arguments).
  """
  lo, hi = bounds[jax.process_index()], bounds[jax.process_index() + 1]
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)[lo:hi]
  if not _rows_local(x, bounds):
    return host_array(x)[lo:hi]
  out = np.empty((hi - lo,) + x.shape[1:], x.dtype)
  done = set()
  for shard in x.addressable_shards:
    s, e = shard.index[0].indices(x.shape[0])[:2]
    a, b = max(s, lo), min(e, hi)
    if a >= b or (a, b) in done:
      continue
    done.add((a, b))
    out[a - lo : b - lo] = np.asarray(shard.data)[a - s : b - s]
  return out


def gather_rows(tree, bounds):
  """Concatenates every process's row blocks (numpy, [rows_i, ...] leaves
  with ``rows_i = bounds[i+1] - bounds[i]``) in process order, on every
  process. A collective when there is more than one process."""
  count = len(bounds) - 1
  if count == 1:
    return tree
  from jax.experimental import multihost_utils

  m = max(bounds[i + 1] - bounds[i] for i in range(count))

  def pad(x):
    x = np.asarray(x)
    return np.pad(x, [(0, m - x.shape[0])] + [(0, 0)] * (x.ndim - 1))

  stacked = multihost_utils.process_allgather(jax.tree.map(pad, tree))
  return jax.tree.map(
    lambda s: np.concatenate(
      [s[i, : bounds[i + 1] - bounds[i]] for i in range(count)]
    ),
    stacked,
  )
