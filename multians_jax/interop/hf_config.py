"""Hugging Face ``config.json`` ↔ ``ModelConfig``, strictly.

``from_hf_config`` rejects every field it does not model (an unknown RoPE
scaling, sliding windows, o_proj / MLP biases, …) with an error naming it;
``to_hf_config`` writes the config ``transformers`` loads our export with.
"""

from __future__ import annotations

from typing import Any

from multians_jax.model import transformer as model_lib

# Fields that carry no architecture information.
_METADATA = set(
  """
    _name_or_path architectures model_type transformers_version dtype
    torch_dtype use_cache initializer_range id2label label2id
    output_attentions output_hidden_states return_dict problem_type
    chunk_size_feed_forward is_encoder_decoder attention_dropout
    max_window_layers sliding_window tokenizer_class embd_pdrop
    resid_pdrop tie_encoder_decoder add_cross_attention tf_legacy_loss
    use_bfloat16 cross_attention_hidden_size finetuning_task prefix
    sep_token_id decoder_start_token_id task_specific_params torchscript
    pruned_heads bad_words_ids output_scores return_dict_in_generate
    is_decoder
    """.split()
)
# Fields read into ModelConfig, or checked by value (``_check_supported``).
_READ = set(
  """
    bos_token_id eos_token_id pad_token_id max_position_embeddings
    rope_parameters rope_theta rope_scaling head_dim tie_word_embeddings
    vocab_size hidden_size intermediate_size num_hidden_layers
    num_attention_heads num_key_value_heads rms_norm_eps
    hidden_act pretraining_tp mlp_bias use_sliding_window layer_types
    attention_bias
    """.split()
)
_ROPE_FIELDS = {
  "rope_type",
  "rope_theta",
  "factor",
  "low_freq_factor",
  "high_freq_factor",
  "original_max_position_embeddings",
}
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


def _check_supported(cfg: dict, family) -> dict:
  """Raises on what we do not model; returns the RoPE parameters."""
  if family not in model_lib.FAMILIES:
    raise ValueError(
      f"unsupported model_type {family!r}; supported: {model_lib.FAMILIES}"
    )
  unknown = sorted(set(cfg) - _METADATA - _READ)
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
  if rp["rope_type"] not in ("default", "llama3"):
    raise ValueError(
      f"unsupported rope scaling type {rp['rope_type']!r} (rope_parameters)"
    )
  extra = sorted(set(rp) - _ROPE_FIELDS)
  if extra:
    raise ValueError(f"unsupported rope_parameters field(s) {extra}")
  return rp


def from_hf_config(cfg: dict, **overrides) -> model_lib.ModelConfig:
  """HF ``config.json`` dict → ModelConfig; rejects what we do not model."""
  family = cfg.get("model_type")
  rp = _check_supported(cfg, family)
  rtype = rp["rope_type"]
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
