"""Metric writers: JSONL file, TensorBoard events (no TensorFlow), progress.

Only process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np


def _clean(v):
  v = float(np.asarray(v))
  return v if math.isfinite(v) else None


class Writer:
  """Appends ``{"step": s, **metrics}`` lines to ``metrics.jsonl``."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(self.path, "a", encoding="utf-8")
      if tensorboard:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: dict, prefix: str = "") -> None:
    if not self.active:
      return
    row = {"step": int(step), "time": round(time.time(), 3)}
    for k, v in metrics.items():
      if np.ndim(v) == 0:
        row[prefix + k] = _clean(v)
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k not in ("step", "time") and v is not None:
          self._tb.add_scalar(k.replace("@", "_at_"), v, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self.active:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  """Rows of a metrics file (torn last line from a kill is skipped)."""
  rows = []
  if not os.path.exists(path):
    return rows
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except ValueError:
        continue
  return rows


def truncate_after(path: str, step: int) -> None:
  """Drops rows logged after ``step`` (they are redone on resume)."""
  if not os.path.exists(path):
    return
  rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)
