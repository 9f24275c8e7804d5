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


@dataclasses.dataclass(frozen=True)
class Micro:
  """One micro-batch: its rows (int32 [n · G] indices into the batch, whole
  groups in order; -1 = a padding row) and its completion width."""

  rows: np.ndarray
  width: int


def groups_fitting(budget: int, prompt_len: int, group: int, width: int,
                   multiple: int = 1) -> int:  # fmt: skip
  """n(W): groups of ``group`` rows at completion width ``width`` whose
  decoder positions n · (T + G · W) fit ``budget``; a multiple of
  ``multiple``, at least ``multiple``."""
  n = budget // (prompt_len + group * width)
  return max(multiple, n // multiple * multiple)


def plan(lengths, *, group: int, prompt_len: int, budget: int, cap: int,
         multiple: int = 1, minimum: int = MIN_COMPLETION_BUCKET):  # fmt: skip
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
    width = completion_bucket(int(longest[order[i]]), cap, minimum)
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


def batch_multiple(mesh, rules, group: int) -> int:
  """Groups per micro-batch that make its rows a multiple of the devices
  the batch axis is sharded over (1 on one device)."""
  shards = math.prod(mesh.shape[a] for a in rules.lookup("batch"))
  return shards // math.gcd(shards, group)
