"""Metric writers: JSONL file, TensorBoard events (no TensorFlow), progress,
and optionally a Weights & Biases run (``log.wandb_project``).

Only process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid

import jax
import numpy as np


def _clean(v):
  v = float(np.asarray(v))
  return v if math.isfinite(v) else None


WANDB_ID_FILE = "wandb_run_id"


class Writer:
  """Appends ``{"step": s, **metrics}`` lines to ``metrics.jsonl``.

  With ``wandb_project`` set, process 0 also sends every row to a W&B run
  (``wandb`` is imported only then; the ``.[wandb]`` extra). The run id is
  kept in ``WORKDIR/wandb_run_id``, so a resumed WORKDIR continues the same
  W&B run. W&B steps only go up: rows of one step merge into one W&B row
  (the warm-up's rows all have step 0), and a step below the run's last one
  (redone after a resume) is ignored there; ``metrics.jsonl`` has them all.
  """

  def __init__(
    self,
    workdir: str,
    tensorboard: bool = True,
    *,
    wandb_project: str = "",
    wandb_entity: str = "",
    wandb_mode: str = "online",
    config: dict | None = None,
  ):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._wandb = None  # the wandb module, while a W&B run is open
    self._wandb_run = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      if wandb_project:  # first: a missing package or login opens nothing
        self._open_wandb(
          workdir, wandb_project, wandb_entity, wandb_mode, config
        )
      self._file = open(self.path, "a", encoding="utf-8")
      if tensorboard:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def _open_wandb(self, workdir, project, entity, mode, config) -> None:
    try:
      import wandb
    except ImportError as e:
      raise ImportError(
        f"log.wandb_project={project!r} needs the wandb package: "
        'pip install -e ".[wandb]"'
      ) from e
    self._wandb = wandb
    self._wandb_run = wandb.init(
      project=project,
      entity=entity or None,
      mode=mode,
      dir=workdir,
      # JSON types only (tuples become lists, other objects strings).
      config=json.loads(json.dumps(config or {}, default=str)),
      id=wandb_run_id(workdir),
      resume="allow",
    )

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
    if self._wandb_run is not None:
      self._wandb_run.log(
        {
          k: v
          for k, v in row.items()
          if k not in ("step", "time") and v is not None
        },
        step=int(step),
      )

  def log_files(self, paths, step: int | None = None, prefix: str = "") -> None:
    """Uploads image files (plots such as ``reliability.png``) to the W&B
    run as ``wandb.Image`` under ``prefix + <file name without extension>``;
    missing files are skipped. Nothing without an open W&B run."""
    if self._wandb_run is None:
      return
    images = {
      prefix + os.path.splitext(os.path.basename(p))[0]: self._wandb.Image(p)
      for p in paths
      if os.path.exists(p)
    }
    if images:
      self._wandb_run.log(images, step=None if step is None else int(step))

  def close(self) -> None:
    """Closes the files and ends the W&B run; a second call does nothing."""
    if self.active and not self._file.closed:
      self._file.close()
      if self._tb is not None:
        self._tb.close()
      if self._wandb_run is not None:
        self._wandb_run.finish()  # = wandb.finish() for this run
        self._wandb_run = self._wandb = None


def wandb_run_id(workdir: str) -> str:
  """The W&B run id of a WORKDIR: read from ``WORKDIR/wandb_run_id``, or
  made (random, 8 lowercase hex digits) and stored there the first time."""
  path = os.path.join(workdir, WANDB_ID_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      run_id = f.read().strip()
    if run_id:
      return run_id
  run_id = uuid.uuid4().hex[:8]
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(run_id + "\n")
  os.replace(tmp, path)
  return run_id


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
