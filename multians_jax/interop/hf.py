"""Hugging Face interop: one key table used both ways, import and export.

The config translation is in ``hf_config.py``, safetensors I/O in
``tensorfile.py``.

``KEY_TABLE`` maps each of our parameters to its HF tensor name and the
reshape between layouts; import and export both read it, and both assert that
every key is used and every shape matches. Tensors come from a *source*
(``keys() / shape(name) / get(name)``): a safetensors directory here (local,
or any ``epath`` URI such as ``gs://``), a GGUF file in ``gguf.py``. Import
builds each parameter from the blocks this process's devices hold: each HF
tensor is read once, and from a safetensors source only the rows those
blocks cover (``read_blocks``), so a process of a pod slice reads its own
part of a tensor split along HF's leading axis.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import tempfile

import jax
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from multians_jax.interop import tensorfile
from multians_jax.interop.hf_config import from_hf_config, to_hf_config
from multians_jax.model import lora
from multians_jax.model import transformer as model_lib

# ---------------------------------------------------------------------------
# The key table: (our name, HF name template, kind). Kinds fix the layouts.


@dataclasses.dataclass(frozen=True)
class Key:
  ours: str  # e.g. "layers.wq"; per-layer when it starts with "layers."
  hf: str  # "{i}" stands for the layer index
  kind: str  # see _TO_OURS


KEY_TABLE: tuple[Key, ...] = (
  Key("embed", "model.embed_tokens.weight", "same"),
  Key("final_norm", "model.norm.weight", "same"),
  Key("lm_head", "lm_head.weight", "linear"),
  Key("layers.attn_norm", "model.layers.{i}.input_layernorm.weight", "same"),
  Key(
    "layers.mlp_norm",
    "model.layers.{i}.post_attention_layernorm.weight",
    "same",
  ),
  Key("layers.wq", "model.layers.{i}.self_attn.q_proj.weight", "heads_in"),
  Key("layers.wk", "model.layers.{i}.self_attn.k_proj.weight", "heads_in"),
  Key("layers.wv", "model.layers.{i}.self_attn.v_proj.weight", "heads_in"),
  Key("layers.wo", "model.layers.{i}.self_attn.o_proj.weight", "heads_out"),
  Key("layers.bq", "model.layers.{i}.self_attn.q_proj.bias", "heads_bias"),
  Key("layers.bk", "model.layers.{i}.self_attn.k_proj.bias", "heads_bias"),
  Key("layers.bv", "model.layers.{i}.self_attn.v_proj.bias", "heads_bias"),
  Key("layers.q_norm", "model.layers.{i}.self_attn.q_norm.weight", "same"),
  Key("layers.k_norm", "model.layers.{i}.self_attn.k_norm.weight", "same"),
  Key("layers.w_gate", "model.layers.{i}.mlp.gate_proj.weight", "linear"),
  Key("layers.w_up", "model.layers.{i}.mlp.up_proj.weight", "linear"),
  Key("layers.w_down", "model.layers.{i}.mlp.down_proj.weight", "linear"),
)


def _to_ours(kind: str, x: np.ndarray, shape: tuple) -> np.ndarray:
  """HF layout → ours. ``shape`` is our (per-layer) shape."""
  if kind == "same":
    return x
  if kind == "linear":  # [out, in] → [in, out]
    return x.T
  if kind == "heads_in":  # [n*h, d] → [d, n, h]
    d, n, h = shape
    return x.reshape(n, h, d).transpose(2, 0, 1)
  if kind == "heads_out":  # [d, n*h] → [n, h, d]
    n, h, d = shape
    return x.reshape(d, n, h).transpose(1, 2, 0)
  if kind == "heads_bias":  # [n*h] → [n, h]
    return x.reshape(shape)
  raise AssertionError(kind)


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
  if kind in ("same",):
    return x
  if kind == "linear":
    return x.T
  if kind == "heads_in":
    d, n, h = x.shape
    return x.transpose(1, 2, 0).reshape(n * h, d)
  if kind == "heads_out":
    n, h, d = x.shape
    return x.transpose(2, 0, 1).reshape(d, n * h)
  if kind == "heads_bias":
    return x.reshape(-1)
  raise AssertionError(kind)


def _hf_shape(kind: str, shape: tuple) -> tuple:
  return _to_hf(kind, np.zeros(shape, np.int8)).shape


def _plan(cfg: model_lib.ModelConfig, state) -> list[tuple[Key, tuple]]:
  """(key, our full shape) for every parameter of the model; checks coverage."""
  flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
  plan = []
  for key in KEY_TABLE:
    if key.ours in flat:
      plan.append((key, tuple(flat.pop(key.ours).shape)))
  if flat:
    raise AssertionError(f"parameters missing from KEY_TABLE: {sorted(flat)}")
  return plan


def _names(key: Key, cfg) -> list[str]:
  if key.ours.startswith("layers."):
    return [key.hf.format(i=i) for i in range(cfg.num_layers)]
  return [key.hf]


# ---------------------------------------------------------------------------
# Import


def check_source(source, cfg: model_lib.ModelConfig, plan) -> None:
  """Every HF key used exactly once, every shape as expected."""
  wanted = {}
  for key, shape in plan:
    per = shape[1:] if key.ours.startswith("layers.") else shape
    for name in _names(key, cfg):
      wanted[name] = _hf_shape(key.kind, per)
  have = set(source.keys())
  missing = sorted(set(wanted) - have)
  if missing:
    raise ValueError(f"checkpoint lacks tensor(s): {missing[:8]}")
  unused = sorted(have - set(wanted))
  if unused:
    raise ValueError(
      f"checkpoint has tensor(s) the model does not use: {unused[:8]}"
    )
  for name, shape in wanted.items():
    if tuple(source.shape(name)) != shape:
      raise ValueError(
        f"tensor {name} has shape {tuple(source.shape(name))}, expected {shape}"
      )


# For each kind: (our axis that becomes HF's leading axis, our axis that
# must be whole for a slice of the first to be a contiguous HF row range, or
# None). HF rows per unit of the first axis = the size of the second.
_ROWS = {
  "same": (0, None),  # [..] → [..]
  "linear": (1, None),  # ours [in, out], HF [out, in]
  "heads_in": (1, 2),  # ours [d, n, h], HF [n*h, d]
  "heads_out": (2, None),  # ours [n, h, d], HF [d, n*h]
  "heads_bias": (0, 1),  # ours [n, h], HF [n*h]
}


def read_blocks(source, name: str, kind: str, shape: tuple, indices) -> list:
  """The float32, our-layout blocks ``indices`` (tuples of slices) of the
  HF tensor ``name``, whose whole shape in our layout is ``shape``. The
  tensor is read once: from a source that reads rows (``source.reads_rows``)
  only the HF rows covering every block, else all of it."""
  axis, inner = _ROWS[kind]
  n = shape[axis]
  spans = [index[axis].indices(n) for index in indices]
  rows = getattr(source, "reads_rows", False) and all(
    step == 1
    and (
      inner is None or idx[inner].indices(shape[inner]) == (0, shape[inner], 1)
    )
    for (_, _, step), idx in zip(spans, indices, strict=True)
  )
  lo, hi = (
    (min(s[0] for s in spans), max(s[1] for s in spans)) if rows else (0, n)
  )
  if rows and (lo, hi) != (0, n):
    per = 1 if inner is None else shape[inner]
    x = source.get(name, rows=(lo * per, hi * per))
  else:
    x = source.get(name)
  part = list(shape)
  part[axis] = hi - lo
  y = _to_ours(kind, np.asarray(x, np.float32), tuple(part))
  out = []
  for index, (a, b, step) in zip(indices, spans, strict=True):
    block = list(index)
    block[axis] = slice(a - lo, b - lo, step)
    out.append(y[tuple(block)])
  return out


def _index_key(index) -> tuple:
  return tuple((s.start, s.stop, s.step) for s in index)


def _build(source, key: Key, shape: tuple, sharding, dtype) -> jax.Array:
  """One parameter as a sharded array. Each distinct block this process's
  devices hold is assembled once; each HF tensor (each layer's, for stacked
  parameters) is read once, only as far as those blocks reach."""
  held = sharding.addressable_devices_indices_map(shape)
  blocks: dict[tuple, tuple[tuple, np.ndarray]] = {}
  for index in held.values():
    k = _index_key(index)
    if k not in blocks:
      sub = tuple(len(range(d)[s]) for d, s in zip(shape, index, strict=True))
      blocks[k] = (index, np.empty(sub, dtype))
  todo = list(blocks.values())
  if key.ours.startswith("layers."):
    for i in range(shape[0]):
      mine = [(idx, buf) for idx, buf in todo if i in range(shape[0])[idx[0]]]
      if not mine:
        continue
      name = key.hf.format(i=i)
      got = read_blocks(
        source, name, key.kind, shape[1:], [idx[1:] for idx, _ in mine]
      )
      for (idx, buf), g in zip(mine, got, strict=True):
        buf[range(shape[0])[idx[0]].index(i)] = g
  else:
    got = read_blocks(source, key.hf, key.kind, shape, [i for i, _ in todo])
    for (_, buf), g in zip(todo, got, strict=True):
      buf[...] = g
  arrays = [
    jax.device_put(blocks[_index_key(index)][1], device)
    for device, index in held.items()
  ]
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def load_params(source, cfg: model_lib.ModelConfig, mesh, rules):
  """Builds the model from an HF-named tensor source, shard by shard."""
  abstract = model_lib.abstract_model(cfg)
  graphdef, abs_state = nnx.split(abstract)
  plan = _plan(cfg, abs_state)
  check_source(source, cfg, plan)
  shardings = model_lib.state_shardings(abs_state, mesh, rules)
  flat_sh = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(shardings)}
  dtype = model_lib.DTYPES[cfg.param_dtype]
  arrays = {
    key.ours: _build(source, key, shape, flat_sh[key.ours], dtype)
    for key, shape in plan
  }
  state = nnx.from_flat_state(
    [(tuple(k.split(".")), v) for k, v in _flat_with(abs_state, arrays)]
  )
  return nnx.merge(graphdef, state)


def _flat_with(abs_state, arrays):
  out = []
  for path, var in nnx.to_flat_state(abs_state):
    name = ".".join(map(str, path))
    out.append((name, var.replace(arrays[name])))
  return out


def load(path: str, mesh, rules, **overrides):
  """HF directory (local or an ``epath`` URI such as ``gs://bucket/dir``)
  → (model, config, tokenizer or None). Any model source:
  ``sources.load_model``."""
  conf = epath.Path(path) / "config.json"
  if not conf.exists():
    raise FileNotFoundError(f"no HF model directory (config.json) at {path}")
  try:
    hf_cfg = json.loads(conf.read_text())
  except ValueError as e:
    raise ValueError(f"{conf}: not valid JSON ({e})") from None
  cfg = from_hf_config(hf_cfg, **overrides)
  with tensorfile.SafetensorsSource(path) as source:
    model = load_params(source, cfg, mesh, rules)
  if source.remote:
    logging.info(
      "read %.1f MB of %.1f MB of weights from %s",
      source.bytes_read / 1e6,
      source.nbytes / 1e6,
      path,
    )
  return model, cfg, tokenizer_from_dir(path)


# Tokenizer files of an HF directory (the Hub fetch takes these too).
TOKENIZER_FILES = (
  "tokenizer*",
  "special_tokens_map.json",
  "chat_template.jinja",
  "vocab.json",
  "merges.txt",
)


def tokenizer_from_dir(path: str):
  """The tokenizer saved in ``path`` or None if there is none. From a remote
  directory its small files (``TOKENIZER_FILES`` and ``config.json``) are
  copied to a temporary directory first: ``transformers`` reads local files
  only."""
  root = epath.Path(path)
  names = ("tokenizer.json", "tokenizer_config.json")
  if not any((root / n).exists() for n in names):
    return None
  from transformers import AutoTokenizer

  if not tensorfile.is_remote(path):
    return AutoTokenizer.from_pretrained(path)
  wanted = (*TOKENIZER_FILES, "config.json")
  with tempfile.TemporaryDirectory(prefix="multians_tokenizer_") as tmp:
    for f in root.iterdir():
      if any(fnmatch.fnmatch(f.name, w) for w in wanted):
        (epath.Path(tmp) / f.name).write_bytes(f.read_bytes())
    return AutoTokenizer.from_pretrained(tmp)


# ---------------------------------------------------------------------------
# Export


def hf_tensors(model: model_lib.Transformer, dtype=None):
  """Yields (HF name, numpy array) for every parameter, gathered to host
  (a LoRA model's merged weights)."""
  model = lora.merge(model)
  cfg = model.cfg
  state = nnx.state(model, nnx.Param)
  flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
  for key, _ in _plan(cfg, state):
    x = np.asarray(jax.device_get(flat[key.ours][...]))
    if dtype is not None:
      x = x.astype(dtype)
    if key.ours.startswith("layers."):
      for i, name in enumerate(_names(key, cfg)):
        yield name, np.ascontiguousarray(_to_hf(key.kind, x[i]))
    else:
      yield key.hf, np.ascontiguousarray(_to_hf(key.kind, x))


def save(
  model: model_lib.Transformer,
  out: str,
  tokenizer=None,
  max_shard_bytes: int = 2 << 30,
  dtype: str | None = None,
) -> None:
  """Writes an HF directory that ``from_pretrained`` loads as it is.

  A model with LoRA adapters is written merged (``lora.merge``): the base
  architecture with W + (alpha / r)·A·B; ``save_adapters`` writes the
  adapters alone. Merged with ``dtype="float32"``, a bfloat16 base keeps
  updates below bfloat16's resolution that a bfloat16 merge rounds away.
  """
  model = lora.merge(model, dtype)
  cfg = model.cfg
  os.makedirs(out, exist_ok=True)
  np_dtype = None if dtype is None else np.dtype(model_lib.DTYPES[dtype])
  hf_cfg = to_hf_config(
    cfg if dtype is None else cfg.replace(param_dtype=dtype)
  )
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  total = 0
  for name, x in hf_tensors(model, np_dtype):
    if shards[-1] and size + x.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = x
    size += x.nbytes
    total += x.nbytes
  for stale in os.listdir(out):
    if stale.startswith("model") and stale.endswith((".safetensors", ".json")):
      os.remove(os.path.join(out, stale))
  if len(shards) == 1:
    tensorfile.write_safetensors(
      os.path.join(out, "model.safetensors"), shards[0]
    )
  else:
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
      tensorfile.write_safetensors(os.path.join(out, fname), shard)
      weight_map.update(dict.fromkeys(shard, fname))
    _write_json(
      os.path.join(out, "model.safetensors.index.json"),
      {"metadata": {"total_size": total}, "weight_map": weight_map},
    )
  _write_json(os.path.join(out, "config.json"), hf_cfg)
  gen = {
    "bos_token_id": cfg.bos_token_id,
    "eos_token_id": hf_cfg["eos_token_id"],
    "pad_token_id": cfg.pad_token_id,
  }
  _write_json(os.path.join(out, "generation_config.json"), gen)
  if tokenizer is not None:
    tokenizer.save_pretrained(out)


def adapter_tensors(model: model_lib.Transformer, dtype=None):
  """Yields (PEFT name, numpy array) for every adapter: our A [L, I..., r]
  and B [L, r, O...] as PEFT's ``lora_A.weight`` [r, in] and
  ``lora_B.weight`` [out, r] of the HF projection (its in / out flattened
  the way ``_to_hf`` flattens the weight, so ΔW_hf = B_peft·A_peft·scale)."""
  cfg = model.cfg
  layers = model.layers.arrays()
  by_ours = {k.ours: k for k in KEY_TABLE}
  for name in cfg.lora_targets:
    proj = by_ours[f"layers.{name}"].hf.removesuffix(".weight")
    a = np.asarray(jax.device_get(layers[f"{name}_lora_a"]))
    b = np.asarray(jax.device_get(layers[f"{name}_lora_b"]))
    if dtype is not None:
      a, b = a.astype(dtype), b.astype(dtype)
    r = cfg.lora_rank
    for i in range(cfg.num_layers):
      pre = "base_model.model." + proj.format(i=i)
      yield f"{pre}.lora_A.weight", np.ascontiguousarray(a[i].reshape(-1, r).T)
      yield f"{pre}.lora_B.weight", np.ascontiguousarray(b[i].reshape(r, -1).T)


def save_adapters(
  model: model_lib.Transformer,
  out: str,
  base_model: str = "",
  dtype: str | None = None,
) -> None:
  """Writes the adapters alone in PEFT's layout (``adapter_config.json`` +
  ``adapter_model.safetensors``), loadable with
  ``peft.PeftModel.from_pretrained(base, out)`` on the base model."""
  cfg = model.cfg
  if not cfg.lora_rank:
    raise ValueError("the model has no LoRA adapters (model.lora_rank = 0)")
  os.makedirs(out, exist_ok=True)
  np_dtype = None if dtype is None else np.dtype(model_lib.DTYPES[dtype])
  hf_names = {v: k for k, v in model_lib.HF_PROJ.items()}
  tensorfile.write_safetensors(
    os.path.join(out, "adapter_model.safetensors"),
    dict(adapter_tensors(model, np_dtype)),
  )
  _write_json(
    os.path.join(out, "adapter_config.json"),
    {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model or None,
      "r": cfg.lora_rank,
      "lora_alpha": cfg.lora_alpha,
      "lora_dropout": 0.0,
      "target_modules": [hf_names[t] for t in cfg.lora_targets],
      "bias": "none",
      "fan_in_fan_out": False,
      "use_rslora": False,
      "use_dora": False,
      "init_lora_weights": True,
      "inference_mode": True,
    },
  )


def _write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
