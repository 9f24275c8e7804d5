"""Hugging Face interop: config, one key table used both ways, safetensors.

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
import math
import os
import tempfile
from typing import Any

import jax
import ml_dtypes
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from multians_jax import lora
from multians_jax import model as model_lib

# ---------------------------------------------------------------------------
# Config: HF dict ↔ ModelConfig (strict).

# Fields that carry no architecture information (or that we check by value).
_IGNORED = set(
  """
    _name_or_path architectures model_type transformers_version dtype
    torch_dtype use_cache initializer_range id2label label2id
    output_attentions output_hidden_states return_dict problem_type
    chunk_size_feed_forward is_encoder_decoder attention_dropout
    max_window_layers sliding_window tokenizer_class bos_token_id
    eos_token_id pad_token_id max_position_embeddings hidden_act
    pretraining_tp mlp_bias use_sliding_window layer_types attention_bias
    rope_parameters rope_theta rope_scaling head_dim tie_word_embeddings
    vocab_size hidden_size intermediate_size num_hidden_layers
    num_attention_heads num_key_value_heads rms_norm_eps embd_pdrop
    resid_pdrop tie_encoder_decoder add_cross_attention tf_legacy_loss
    use_bfloat16 cross_attention_hidden_size finetuning_task prefix
    sep_token_id decoder_start_token_id task_specific_params torchscript
    pruned_heads bad_words_ids output_scores return_dict_in_generate
    is_decoder
    """.split()
)
_ARCH = {
  "llama": "LlamaForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
}


def _rope(cfg: dict) -> dict:
  rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
  if "rope_theta" not in rp:
    rp["rope_theta"] = cfg.get("rope_theta", 10000.0)
  rp.setdefault("rope_type", rp.pop("type", "default"))
  return rp


def from_hf_config(cfg: dict, **overrides) -> model_lib.ModelConfig:
  """HF ``config.json`` dict → ModelConfig; rejects what we do not model."""
  family = cfg.get("model_type")
  if family not in model_lib.FAMILIES:
    raise ValueError(
      f"unsupported model_type {family!r}; supported: {model_lib.FAMILIES}"
    )
  unknown = sorted(set(cfg) - _IGNORED)
  if unknown:
    raise ValueError(f"unsupported HF config field(s) {unknown} for {family}")

  def require(key, ok, why):
    if key in cfg and cfg[key] is not None and not ok(cfg[key]):
      raise ValueError(f"unsupported HF config: {key}={cfg[key]!r} ({why})")

  require("hidden_act", lambda v: v == "silu", "only SwiGLU/silu is modelled")
  require("pretraining_tp", lambda v: v == 1, "tensor-parallel slicing")
  require("mlp_bias", lambda v: not v, "MLP biases are not modelled")
  require("attention_bias", lambda v: not v, "o_proj bias is not modelled")
  require("use_sliding_window", lambda v: not v, "sliding windows")
  require(
    "layer_types",
    lambda v: all(t == "full_attention" for t in v),
    "only full attention layers",
  )
  rp = _rope(cfg)
  rtype = rp.get("rope_type", "default")
  if rtype not in ("default", "llama3"):
    raise ValueError(
      f"unsupported rope scaling type {rtype!r} (rope_parameters)"
    )
  known_rope = {
    "rope_type",
    "rope_theta",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
  }
  extra = sorted(set(rp) - known_rope)
  if extra:
    raise ValueError(f"unsupported rope_parameters field(s) {extra}")
  n = cfg["num_attention_heads"]
  kw = dict(
    family=family,
    vocab_size=cfg["vocab_size"],
    d_model=cfg["hidden_size"],
    num_layers=cfg["num_hidden_layers"],
    num_heads=n,
    num_kv_heads=cfg.get("num_key_value_heads") or n,
    head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n,
    d_ff=cfg["intermediate_size"],
    rope_theta=float(rp["rope_theta"]),
    norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
    tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    qkv_bias=family == "qwen2",
    qk_norm=family == "qwen3",
    max_seq_len=int(cfg.get("max_position_embeddings") or 4096),
    bos_token_id=cfg.get("bos_token_id"),
    eos_token_id=_eos(cfg.get("eos_token_id")),
    pad_token_id=cfg.get("pad_token_id"),
  )
  if rtype == "llama3":
    kw.update(
      rope_type="llama3",
      rope_factor=float(rp["factor"]),
      rope_low_freq_factor=float(rp["low_freq_factor"]),
      rope_high_freq_factor=float(rp["high_freq_factor"]),
      rope_original_max_pos=int(rp["original_max_position_embeddings"]),
    )
  kw.update(overrides)
  return model_lib.ModelConfig(**kw)


def _eos(e):
  return tuple(e) if isinstance(e, list) else e


def to_hf_config(cfg: model_lib.ModelConfig) -> dict:
  """ModelConfig → HF ``config.json`` dict (transformers 5 field names)."""
  rp: dict[str, Any] = {
    "rope_type": cfg.rope_type,
    "rope_theta": cfg.rope_theta,
  }
  if cfg.rope_type == "llama3":
    rp.update(
      factor=cfg.rope_factor,
      low_freq_factor=cfg.rope_low_freq_factor,
      high_freq_factor=cfg.rope_high_freq_factor,
      original_max_position_embeddings=cfg.rope_original_max_pos,
    )
  eos = cfg.eos_token_id
  out = {
    "architectures": [_ARCH[cfg.family]],
    "model_type": cfg.family,
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.d_model,
    "intermediate_size": cfg.d_ff,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads,
    "head_dim": cfg.head_dim,
    "hidden_act": "silu",
    "rms_norm_eps": cfg.norm_eps,
    "rope_parameters": rp,
    "tie_word_embeddings": cfg.tie_embeddings,
    "max_position_embeddings": cfg.max_seq_len,
    "bos_token_id": cfg.bos_token_id,
    "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
    "pad_token_id": cfg.pad_token_id,
    "dtype": cfg.param_dtype,
  }
  if cfg.family == "qwen3":
    out["attention_bias"] = False
  if cfg.family == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  return out


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


def is_remote(path) -> bool:
  """A URI (``gs://``, ``s3://``, …) read through ``etils.epath``."""
  return "://" in os.fspath(path)


def load(path: str, mesh, rules, **overrides):
  """HF directory (local or an ``epath`` URI such as ``gs://bucket/dir``) or
  local ``.gguf`` file → (model, config, tokenizer or None)."""
  if path.endswith(".gguf"):
    from multians_jax import gguf

    source = gguf.GGUFSource(path)
    cfg = from_hf_config(source.hf_config, **overrides)
    return load_params(source, cfg, mesh, rules), cfg, source.tokenizer()
  conf = epath.Path(path) / "config.json"
  if not conf.exists():
    raise FileNotFoundError(
      f"no HF model directory (config.json) or .gguf file at {path}"
    )
  try:
    hf_cfg = json.loads(conf.read_text())
  except ValueError as e:
    raise ValueError(f"{conf}: not valid JSON ({e})") from None
  cfg = from_hf_config(hf_cfg, **overrides)
  with SafetensorsSource(path) as source:
    model = load_params(source, cfg, mesh, rules)
  if source.remote:
    logging.info(
      "read %.1f MB of %.1f MB of weights from %s",
      source.bytes_read / 1e6,
      source.nbytes / 1e6,
      path,
    )
  return model, cfg, load_tokenizer(path)


# Tokenizer files of an HF directory (the Hub fetch takes these too).
TOKENIZER_FILES = (
  "tokenizer*",
  "special_tokens_map.json",
  "chat_template.jinja",
  "vocab.json",
  "merges.txt",
)


def load_tokenizer(path: str):
  """The tokenizer saved in ``path`` or None if there is none. From a remote
  directory its small files (``TOKENIZER_FILES`` and ``config.json``) are
  copied to a temporary directory first: ``transformers`` reads local files
  only."""
  root = epath.Path(path)
  names = ("tokenizer.json", "tokenizer_config.json")
  if not any((root / n).exists() for n in names):
    return None
  from transformers import AutoTokenizer

  if not is_remote(path):
    return AutoTokenizer.from_pretrained(path)
  wanted = (*TOKENIZER_FILES, "config.json")
  with tempfile.TemporaryDirectory(prefix="multians_tokenizer_") as tmp:
    for f in root.iterdir():
      if any(fnmatch.fnmatch(f.name, w) for w in wanted):
        (epath.Path(tmp) / f.name).write_bytes(f.read_bytes())
    return AutoTokenizer.from_pretrained(tmp)


# ---------------------------------------------------------------------------
# safetensors, read lazily with memory maps and written directly.

_ST_DTYPES = {
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "F64": np.float64,
  "I64": np.int64,
  "I32": np.int32,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class SafetensorsSource:
  """HF tensors of a directory (single file or sharded with an index),
  local or any ``epath`` URI (``gs://``, ``s3://``, …). Local files are
  memory-mapped; remote ones are read by byte range through open handles,
  ``get(name, rows=(a, b))`` reading rows a..b of the leading axis only.
  ``bytes_read`` counts the tensor bytes read from a remote directory."""

  reads_rows = True

  def __init__(self, path: str):
    root = epath.Path(path)
    self.remote = is_remote(path)
    index = root / "model.safetensors.index.json"
    if index.exists():
      try:
        files = sorted(
          set(json.loads(index.read_text())["weight_map"].values())
        )
      except (ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"{index}: not a safetensors index ({e!r})") from None
    elif (root / "model.safetensors").exists():
      files = ["model.safetensors"]
    else:
      raise FileNotFoundError(f"no model.safetensors(.index.json) in {path}")
    self._where: dict[str, tuple[Any, dict, int]] = {}
    self._handles: dict[str, Any] = {}
    self.bytes_read = 0
    self.nbytes = 0
    for fname in files:
      full = root / fname
      if not full.exists():
        raise FileNotFoundError(f"{full}: named by the index but missing")
      header, start = _read_header(full)
      for name, info in header.items():
        if name != "__metadata__":
          self._where[name] = (full, info, start)
          b, e = info["data_offsets"]
          self.nbytes += e - b

  def keys(self) -> list[str]:
    return list(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name][1]["shape"])

  def get(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
    full, info, start = self._where[name]
    b, e = info["data_offsets"]
    dt = np.dtype(_ST_DTYPES[info["dtype"]])
    shape = list(info["shape"])
    if rows is not None and shape:
      lo, hi = rows
      if not 0 <= lo <= hi <= shape[0]:
        raise IndexError(f"{name}: rows {rows} outside [0, {shape[0]}]")
      row = dt.itemsize * math.prod(shape[1:])
      b, e = b + lo * row, b + hi * row
      shape[0] = hi - lo
    if not self.remote:
      mm = np.memmap(
        os.fspath(full), dtype=np.uint8, mode="r", offset=start + b,
        shape=(e - b,),
      )  # fmt: skip
      return mm.view(dt).reshape(shape)
    f = self._handles.get(str(full))
    if f is None:
      f = self._handles[str(full)] = full.open("rb")
    f.seek(start + b)
    data = f.read(e - b)
    if len(data) != e - b:
      raise ValueError(f"{full}: truncated while reading tensor {name}")
    self.bytes_read += len(data)
    return np.frombuffer(data, dt).reshape(shape)

  def close(self) -> None:
    for f in self._handles.values():
      f.close()
    self._handles.clear()

  def __enter__(self) -> SafetensorsSource:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _read_header(path) -> tuple[dict, int]:
  path = epath.Path(path)
  size = path.stat().length
  with path.open("rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ValueError(f"{path}: not a safetensors file (too short)")
    n = int.from_bytes(raw, "little")
    if n > size - 8:
      raise ValueError(f"{path}: truncated safetensors header")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
  end = max(
    (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
    default=0,
  )
  if 8 + n + end > size:
    raise ValueError(
      f"{path}: truncated safetensors file ({size} bytes, header says "
      f"{8 + n + end}); re-download or re-export it"
    )
  for k, v in header.items():
    if k != "__metadata__" and v["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{path}: tensor {k} has unsupported dtype {v['dtype']}")
  return header, 8 + n


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  off = 0
  for name, x in tensors.items():
    nbytes = x.nbytes
    header[name] = {
      "dtype": _ST_NAMES[x.dtype],
      "shape": list(x.shape),
      "data_offsets": [off, off + nbytes],
    }
    off += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for x in tensors.values():
      f.write(np.ascontiguousarray(x).tobytes())
  os.replace(tmp, path)


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
    write_safetensors(os.path.join(out, "model.safetensors"), shards[0])
  else:
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
      write_safetensors(os.path.join(out, fname), shard)
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
  write_safetensors(
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
