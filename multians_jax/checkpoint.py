"""The one on-disk checkpoint layout.

Layout of a checkpoint directory (local path or ``gs://``)::

    DIR/model_config.json     ModelConfig fields (architecture, dtypes)
    DIR/tokenizer/            tokenizer files (``save_pretrained``), optional
    DIR/<step>/params/        Orbax PyTree of the model's parameters
    DIR/base/                 under LoRA: the frozen base, written once;
                              each step's params/ then holds the adapters
    DIR/<step>/<item>/        further PyTree items (optimizer state, …)
    DIR/<step>/meta/          JSON: step, PRNG key, data-iterator state, …

Steps are written by an Orbax ``CheckpointManager`` (atomic: a step directory
appears only when complete), in OCDBT's layout, each chunk compressed
(zstd) or, with ``compress=False``, stored as it is: compressing holds
about the saved bytes again in host memory while the save runs and keeps
much of it after (1.1-1.3 GB more for 1.6 GB of state on CPU, against
0.00-0.02 GB uncompressed; BENCHMARKS.md, "Demo"), and float weights
shrink by about 10 %. Restores read either. ``sources.load_model`` opens any
model source, a checkpoint directory among them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from multians_jax.interop import hf
from multians_jax.model import transformer as model_lib

CONFIG_FILE = "model_config.json"
TOKENIZER_DIR = "tokenizer"
BASE_DIR = "base"


def is_checkpoint(path: str) -> bool:
  return (epath.Path(path) / CONFIG_FILE).exists()


def write_model_config(path: str, cfg: model_lib.ModelConfig) -> None:
  p = epath.Path(path)
  p.mkdir(parents=True, exist_ok=True)
  (p / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2))


def read_model_config(path: str, **overrides) -> model_lib.ModelConfig:
  p = epath.Path(path) / CONFIG_FILE
  try:
    raw = json.loads(p.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"unreadable model config {p}: {e}") from None
  if isinstance(raw.get("eos_token_id"), list):
    raw["eos_token_id"] = tuple(raw["eos_token_id"])
  fields = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  unknown = sorted(set(raw) - fields)
  if unknown:
    raise ValueError(f"{p}: unknown ModelConfig field(s) {unknown}")
  return model_lib.ModelConfig(**{**raw, **overrides})


def abstract_params(cfg, mesh, rules) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, abstract state, pure dict of sharded ShapeDtypeStructs)."""
  graphdef, abs_state = nnx.split(model_lib.abstract_model(cfg))
  return graphdef, abs_state, _target(abs_state, mesh, rules)


def _target(abs_state, mesh, rules):
  shardings = model_lib.state_shardings(abs_state, mesh, rules)
  return jax.tree.map(
    lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
    nnx.to_pure_dict(abs_state),
    nnx.to_pure_dict(shardings),
  )


class Checkpointer:
  """Saves and restores steps of ``params`` (+ extra items) and ``meta``."""

  def __init__(
    self,
    path: str,
    max_to_keep: int | None = 3,
    async_save: bool = True,
    compress: bool = True,
  ):
    path = str(path)
    # Orbax needs absolute paths; gs:// and other URLs are kept as given.
    self.path = path if "://" in path else os.path.abspath(path)
    opts = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      enable_async_checkpointing=async_save,
    )
    self.compress = compress
    self.manager = ocp.CheckpointManager(
      self.path, options=opts, handler_registry=_registry(compress)
    )
    self._base_saved = False

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(
    self,
    step: int,
    model: model_lib.Transformer,
    meta: dict | None = None,
    items: dict[str, Any] | None = None,
    tokenizer=None,
    force: bool = True,
  ) -> None:
    if jax.process_index() == 0 and not is_checkpoint(self.path):
      write_model_config(self.path, model.cfg)
      if tokenizer is not None:
        tokenizer.save_pretrained(str(epath.Path(self.path) / TOKENIZER_DIR))
    state = nnx.state(model, nnx.Param)
    if model.cfg.lora_rank:  # the adapters; the frozen base once
      state, base = nnx.split_state(state, nnx.LoRAParam, ...)
      self._save_base(base)
    args = {"params": ocp.args.StandardSave(nnx.to_pure_dict(state))}
    for name, tree in (items or {}).items():
      args[name] = ocp.args.StandardSave(tree)
    args["meta"] = ocp.args.JsonSave({"step": step, **(meta or {})})
    self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def _save_base(self, base) -> None:
    """Writes DIR/base once (synchronously, before the first step that
    needs it, so a step on disk always has its base)."""
    if self._base_saved:
      return
    where = epath.Path(self.path) / BASE_DIR
    if not _base_complete(where):
      saver = ocp.Checkpointer(_pytree_handler(self.compress))
      saver.save(where, args=ocp.args.PyTreeSave(nnx.to_pure_dict(base)))
      saver.close()  # a Checkpointer saves synchronously
    self._base_saved = True

  def quarantine(self, step: int) -> str:
    """Moves an unreadable step aside (kept for inspection, out of the way
    of new saves) and returns where it went."""
    src = epath.Path(self.path) / str(step)
    dst = epath.Path(self.path) / f"unreadable-step-{step}-{int(time.time())}"
    src.rename(dst)
    self.manager.reload()
    return str(dst)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def restore(
    self,
    mesh,
    rules,
    step: int | None = None,
    items: dict[str, Any] | None = None,
    **overrides,
  ) -> tuple[model_lib.Transformer, dict, dict]:
    """Restores (model, meta, items) from ``step`` (default: the latest).

    ``items`` maps names to abstract targets (with shardings) to restore.
    """
    cfg = read_model_config(self.path, **overrides)
    if step is None:
      step = self.manager.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint steps in {self.path}")
    graphdef, abs_state = nnx.split(model_lib.abstract_model(cfg))
    base = None
    if cfg.lora_rank:
      abs_state, abs_base = nnx.split_state(abs_state, nnx.LoRAParam, ...)
      base = self._restore_base(abs_base, mesh, rules)
    target = _target(abs_state, mesh, rules)
    args = {"params": ocp.args.StandardRestore(target)}
    for name, tree in (items or {}).items():
      args[name] = ocp.args.StandardRestore(tree)
    args["meta"] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    params = out["params"]
    _check_restored(params, target, self.path, step)
    nnx.replace_by_pure_dict(abs_state, params)
    if base is not None:
      abs_state = nnx.merge_state(abs_state, base)
    model = nnx.merge(graphdef, abs_state)
    rest = {k: out[k] for k in (items or {})}
    return model, dict(out["meta"]), rest

  def restore_newest(
    self, mesh, rules, items: dict[str, Any] | None = None
  ) -> tuple[int, model_lib.Transformer, dict, dict] | None:
    """``(step, model, meta, items)`` of the newest step that restores, or
    None when there is none. A step that fails to restore (a torn write, a
    corrupt file) is skipped with a warning, and every step newer than the
    one restored is moved aside (``quarantine``), so new saves go on from
    a good state and nothing on disk is deleted."""
    steps = self.steps()
    for step in reversed(steps):
      try:
        model, meta, rest = self.restore(mesh, rules, step=step, items=items)
      except Exception as e:  # noqa: BLE001 - any unreadable step falls back
        logging.warning(
          "checkpoint step %d unreadable (%s: %s); trying an older one",
          step,
          type(e).__name__,
          e,
        )
        continue
      for bad in [s for s in steps if s > step]:
        where = self.quarantine(bad)
        logging.warning("moved unreadable checkpoint step %d to %s", bad, where)
      return step, model, meta, rest
    if steps:
      logging.warning(
        "no restorable checkpoint in %s: starting fresh", self.path
      )
    return None

  def _restore_base(self, abs_base, mesh, rules):
    where = epath.Path(self.path) / BASE_DIR
    if not where.exists():
      raise FileNotFoundError(
        f"{self.path}: a LoRA checkpoint (model_config.json has lora_rank "
        f"> 0) needs its frozen base in {where}, which is missing"
      )
    target = _target(abs_base, mesh, rules)
    saver = ocp.StandardCheckpointer()
    try:
      params = saver.restore(where, target)
    finally:
      saver.close()
    _check_restored(params, target, str(where), "base")
    nnx.replace_by_pure_dict(abs_base, params)
    return abs_base


class _TreeHandler(ocp.StandardCheckpointHandler):
  """Orbax's handler of a PyTree of arrays with its PyTree handler's
  compression switch, which ``StandardCheckpointHandler`` does not pass
  on (its other settings kept)."""

  def __init__(self, compress: bool):
    super().__init__()
    # The handler delegates to ``_impl`` (orbax-checkpoint 0.12); should it
    # stop, tests/test_loop.py's compression test fails.
    self._impl = _pytree_handler(compress)


def _pytree_handler(compress: bool) -> ocp.PyTreeCheckpointHandler:
  """The PyTree handler as ``StandardCheckpointHandler`` makes it, with
  ``use_compression`` (the same on-disk format as its saves)."""
  return ocp.PyTreeCheckpointHandler(
    save_concurrent_gb=96, restore_concurrent_gb=96, use_compression=compress
  )


def _registry(compress: bool):
  """The handlers of a step's items: PyTrees compressed or not (a restore
  reads what a checkpoint was written with), JSON for meta."""
  reg = ocp.handlers.DefaultCheckpointHandlerRegistry()
  tree = _TreeHandler(compress)
  reg.add(None, ocp.args.StandardSave, tree)
  reg.add(None, ocp.args.StandardRestore, tree)
  reg.add(None, ocp.args.JsonSave, ocp.JsonCheckpointHandler())
  reg.add(None, ocp.args.JsonRestore, ocp.JsonCheckpointHandler())
  return reg


def save_train_state(ckpt: Checkpointer, step: int, graphdef, state, *,
                     tokenizer, meta: dict) -> None:  # fmt: skip
  """A training step's checkpoint: the policy (as a model, readable by
  ``load_model``), the optimizer state and the step counters, with
  ``meta`` (the data stream's position, the seed)."""
  ckpt.save(
    step,
    nnx.merge(graphdef, state.params),
    tokenizer=tokenizer,
    meta=meta,
    items={
      "opt_state": state.opt_state,
      "train": {"step": state.step, "skipped": state.skipped},
    },
  )


def restore_train_state(ckpt: Checkpointer, state, mesh, rules):
  """(state, meta) of the newest restorable step in ``state``'s layout, or
  (``state``, None) when there is none. ``state``: an
  ``update.TrainState``, whose type the restored one keeps."""
  abstract = lambda t: jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), t
  )
  items = {
    "opt_state": abstract(state.opt_state),
    "train": abstract({"step": state.step, "skipped": state.skipped}),
  }
  got = ckpt.restore_newest(mesh, rules, items)
  if got is None:
    return state, None
  step, model, meta, items = got
  t = items["train"]
  restored = type(state)(
    t["step"], nnx.state(model, nnx.Param), items["opt_state"], t["skipped"]
  )
  logging.info("resumed from step %d", step)
  return restored, meta


def _base_complete(where) -> bool:
  """Whether DIR/base holds a finished write, decided on process 0 (on
  gs:// an unfinished write already has its directory) and agreed by all
  processes, which then all save or all skip (the save is collective). An
  unfinished one (a preempted first save) is removed, to be rewritten."""
  done = 0
  if jax.process_index() == 0 and where.exists():
    done = int(ocp.utils.is_checkpoint_finalized(where))
    if not done:
      where.rmtree()
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils

    done = int(multihost_utils.broadcast_one_to_all(np.int32(done)))
  return bool(done)


def _check_restored(params, target, path, step) -> None:
  got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  want = jax.tree.map(lambda x: (x.shape, x.dtype), target)
  if got != want:
    raise ValueError(
      f"checkpoint {path} step {step} does not match its model config"
    )


def saved_tokenizer(path: str):
  """The tokenizer saved in a checkpoint directory (``tokenizer/``), or
  None when it was saved without one."""
  tok_dir = epath.Path(path) / TOKENIZER_DIR
  return hf.tokenizer_from_dir(str(tok_dir)) if tok_dir.exists() else None
