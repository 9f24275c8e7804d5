"""Token-budget micro-batches: the update's rows grouped by length.

The update's rows come in groups of G (one prompt, its G completions; G = 1
without prompt sharing). ``plan`` sorts the groups by their longest
completion, longest first, and cuts the sorted list into micro-batches of
whole groups. A micro-batch runs at the completion width W of its longest
row's bucket (``completion_bucket``: a power of two) and holds as many
groups as fit the budget of decoder positions, n · (T + G · W) ≤ budget
(T the prompt bucket; each prompt runs once per group). So a micro-batch of
short completions holds more groups than one of long ones, and no row is
padded to a longer row of another micro-batch.

Shapes stay few, so compilations stay bounded: the group counts are n(W)
for the budget at each bucket W, or a power of two below it (the last
groups, n(W) not filled, are split in binary: 6 left → 4 + 2, no padding).
Counts are multiples of ``multiple`` (so the rows divide the batch axis'
devices); only there can a micro-batch hold padding rows (index -1: a copy
of a real row that counts for nothing). Whatever the budget, a micro-batch
holds at least ``multiple`` groups.

The update stays exact: every loss aggregation's numerator is a sum over
rows, divided by the whole batch's denominator (``loss.loss_denominator``),
so the sum over micro-batches is the full-batch loss and gradient whatever
the grouping (``tests/test_update.py``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

MIN_COMPLETION_BUCKET = 16


def completion_bucket(n: int, cap: int, minimum: int = MIN_COMPLETION_BUCKET):
  """The completion width the update runs at for a longest completion of
  ``n`` tokens: the smallest power of two ≥ max(n, minimum), at most the
  sampler's cap. One compilation per bucket: at most
  ⌈log2(cap / minimum)⌉ + 1 of them."""
  width = minimum
  while width < n:
    width *= 2
  return min(width, cap)


def packed_bucket(n: int, cap: int, minimum: int = MIN_COMPLETION_BUCKET):
  """The width of a packed row of ``n`` tokens: the smallest of minimum ·
  2^k and 1.5 · minimum · 2^k that holds them (at most a third wasted,
  twice the power-of-two ladder's shapes), at most ``cap``."""
  width = minimum
  while width < n:
    width = width * 3 // 2 if width & (width - 1) == 0 else width * 4 // 3
  return min(width, cap)


@dataclasses.dataclass(frozen=True)
class Micro:
  """One micro-batch: its rows (int32 [n · G] indices into the batch, whole
  groups in order; -1 = a padding row) and its completion width.

  Packed (``pack``): each group's completions sit one after another in one
  row of ``width`` columns; ``src`` int32 [n, width] names each column's
  completion token (batch row · L + column; -1 none) and ``dst`` int32
  [n · G, L] each row's token's column in the packed rows (row · width +
  column; -1 none)."""

  rows: np.ndarray
  width: int
  src: np.ndarray | None = None
  dst: np.ndarray | None = None


def groups_fitting(budget: int, prompt_len: int, group: int, width: int,
                   multiple: int = 1) -> int:  # fmt: skip
  """n(W): groups of ``group`` rows at completion width ``width`` whose
  decoder positions n · (T + G · W) fit ``budget``; a multiple of
  ``multiple``, at least ``multiple``."""
  n = budget // (prompt_len + group * width)
  return max(multiple, n // multiple * multiple)


def plan(lengths, *, group: int, prompt_len: int, budget: int, cap: int,
         multiple: int = 1, minimum: int = MIN_COMPLETION_BUCKET,
         bucket=completion_bucket):  # fmt: skip
  """The micro-batches of one optimizer batch (a list of ``Micro``).

  Args:
    lengths: int [B] completion lengths (tokens counted by the loss), rows
      in prompt-major groups of ``group``.
    group: G, rows per group (kept together: they share their prompt).
    prompt_len: T, the prompt bucket of the batch.
    budget: decoder positions per micro-batch (``rl.micro_batch_tokens``).
    cap: the widest completion width (the batch's columns).
    multiple: group counts are multiples of it (``batch_multiple``).
    minimum: the narrowest bucket.
    bucket: (longest, cap, minimum) → the micro-batch's width.

  Every row appears exactly once; padding rows (-1) only round a count up
  to ``multiple``.
  """
  lengths = np.asarray(lengths).reshape(-1)
  if lengths.size % group:
    raise ValueError(f"{lengths.size} rows are not groups of {group}")
  if budget < 1 or multiple < 1:
    raise ValueError(f"budget and multiple must be >= 1: {budget}, {multiple}")
  longest = lengths.reshape(-1, group).max(axis=1)
  order = np.argsort(-longest, kind="stable")
  out, i = [], 0
  while i < order.size:
    width = bucket(int(longest[order[i]]), cap, minimum)
    n = groups_fitting(budget, prompt_len, group, width, multiple)
    left = order.size - i
    if left < n:  # the largest power-of-two multiple of ``multiple``
      n = multiple
      while n * 2 <= left:
        n *= 2
    take = order[i : i + n]
    i += take.size
    rows = (take[:, None] * group + np.arange(group)).reshape(-1)
    pad = np.full((n - take.size) * group, -1)
    out.append(Micro(np.concatenate([rows, pad]).astype(np.int32), width))
  return out


def pack(extents, *, group: int, prompt_len: int, budget: int, cap: int,
         multiple: int = 1, minimum: int = MIN_COMPLETION_BUCKET):  # fmt: skip
  """Packed micro-batches: each group's G completions, one after another,
  in one row (``Micro.src`` / ``dst``), the prompt once in front of them.

  ``extents``: int [B], each row's completion columns up to its last real
  token (the columns the row's loss can touch). A group is planned as one
  row of its total extent (``plan`` with G = 1, ``packed_bucket`` widths up
  to G · ``cap``), so the budget counts n · (T + width) positions and no
  completion is padded to another's length. ``budget`` 0: one micro-batch
  of every group (split in powers of two as ``plan`` splits left-overs).
  """
  ext = np.asarray(extents).reshape(-1)
  if ext.size % group:
    raise ValueError(f"{ext.size} rows are not groups of {group}")
  if ext.size and (ext.min() < 0 or ext.max() > cap):
    raise ValueError(f"extents must lie in [0, {cap}]: {ext.min()}…{ext.max()}")
  totals = ext.reshape(-1, group).sum(axis=1)
  groups = plan(
    totals, group=1, prompt_len=prompt_len, budget=budget or np.iinfo(int).max,
    cap=group * cap, multiple=multiple, minimum=minimum, bucket=packed_bucket,
  )  # fmt: skip
  return [_packed(m.rows, m.width, ext, group, cap) for m in groups]


def _packed(gids, width, ext, group, cap) -> Micro:
  """The ``Micro`` of groups ``gids`` (-1: padding) packed at ``width``."""
  n = gids.size
  src = np.full((n, width), -1, np.int32)
  dst = np.full((n * group, cap), -1, np.int32)
  rows = np.full(n * group, -1, np.int32)
  for j, g in enumerate(gids):
    if g < 0:
      continue
    at = 0
    for k in range(group):
      row, e = g * group + k, int(ext[g * group + k])
      rows[j * group + k] = row
      src[j, at : at + e] = row * cap + np.arange(e)
      dst[j * group + k, :e] = j * width + at + np.arange(e)
      at += e
  return Micro(rows, width, src, dst)


def equal_split(micro, rows: int, width: int) -> int | None:
  """M when the plan ``micro`` is M consecutive equal micro-batches of the
  ``rows`` at the batch's ``width`` (e.g. forced lengths): the work of
  ``update.update_step``, as one program; else None. One program is faster
  (BENCHMARKS.md: separate calls allocate their temporaries afresh)."""
  if not micro or micro[0].src is not None:
    return None
  n = micro[0].rows.size
  same = all(m.width == width and m.rows.size == n for m in micro)
  order = np.concatenate([m.rows for m in micro])
  if same and n * len(micro) == rows and (order == np.arange(rows)).all():
    return len(micro)
  return None


def extents(mask) -> np.ndarray:
  """int [B]: columns up to each row's last True (0 for none)."""
  mask = np.asarray(mask, bool)
  last = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)
  return np.where(mask.any(axis=1), last, 0)


def batch_multiple(mesh, rules, group: int) -> int:
  """Groups per micro-batch that make its rows a multiple of the devices
  the batch axis is sharded over (1 on one device)."""
  shards = math.prod(mesh.shape[a] for a in rules.lookup("batch"))
  return shards // math.gcd(shards, group)
