"""A decoder's architecture and numerics: ``ModelConfig``, the named
architectures (``ARCHS``) and the settings' tables (dtypes, attention
backends, LoRA targets). A leaf: the run config validates model settings
with it without loading the model."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
IMPLS = ("xla", "cudnn", "splash")  # attention backends (attention.py)
FAMILIES = ("llama", "qwen2", "qwen3")
REMAT = ("none", "full", "dots")
# Projections that take low-rank adapters, and their Hugging Face names.
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
HF_PROJ = {
  "q_proj": "wq",
  "k_proj": "wk",
  "v_proj": "wv",
  "o_proj": "wo",
  "gate_proj": "w_gate",
  "up_proj": "w_up",
  "down_proj": "w_down",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a decoder. Hashable (static under jit)."""

  family: str  # llama | qwen2 | qwen3
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  rope_theta: float = 10000.0
  rope_type: str = "default"  # default | llama3
  rope_factor: float = 1.0  # llama3 scaling fields
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_pos: int = 8192
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2
  qk_norm: bool = False  # Qwen3
  max_seq_len: int = 4096
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype
  remat: str = "none"  # none | full | dots (save matmul outputs)
  attention: str = "xla"  # xla | cudnn | splash (attention.py)
  # LoRA: rank r > 0 adds adapters A [in, r], B [r, out] to each target
  # projection, y = x·W + (alpha / r)·(x·A)·B (lora.py; B starts at zero).
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = LORA_TARGETS  # ours or HF names ("q_proj")

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"model.family must be one of {FAMILIES}: {self.family}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"model.num_heads ({self.num_heads}) must be a multiple of "
        f"model.num_kv_heads ({self.num_kv_heads})"
      )
    if self.rope_type not in ("default", "llama3"):
      raise ValueError(f"model.rope_type unsupported: {self.rope_type}")
    for f in ("param_dtype", "dtype"):
      if getattr(self, f) not in DTYPES:
        raise ValueError(f"model.{f} must be one of {tuple(DTYPES)}")
    if self.remat not in REMAT:
      raise ValueError(f"model.remat must be one of {REMAT}: {self.remat}")
    if self.attention not in IMPLS:
      raise ValueError(
        f"model.attention must be one of {IMPLS}: {self.attention!r}"
      )
    targets = check_lora(self.lora_rank, self.lora_alpha, self.lora_targets)
    object.__setattr__(self, "lora_targets", targets)

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)

  @property
  def eos_ids(self) -> tuple[int, ...]:
    e = self.eos_token_id
    return () if e is None else (e,) if isinstance(e, int) else tuple(e)


def check_lora(rank: int, alpha: float, targets) -> tuple[str, ...]:
  """Validates ``model.lora_*``; returns the targets in canonical form."""
  names = lora_targets(targets)
  if rank < 0:
    raise ValueError(f"model.lora_rank must be >= 0: {rank}")
  if rank and not alpha > 0:
    raise ValueError(f"model.lora_alpha must be > 0: {alpha}")
  if rank and not names:
    raise ValueError("model.lora_targets is empty: name the projections")
  return names


def lora_targets(targets) -> tuple[str, ...]:
  """Target projections (a sequence, or one comma-separated string; ``all``
  = every projection) → our names in canonical order."""
  if isinstance(targets, str):
    targets = [t.strip() for t in targets.split(",") if t.strip()]
  names = set()
  for t in targets:
    if t == "all":
      names.update(LORA_TARGETS)
      continue
    name = HF_PROJ.get(t, t)
    if name not in LORA_TARGETS:
      raise ValueError(
        f"model.lora_targets: unknown projection {t!r}; known: "
        f"{LORA_TARGETS} or {tuple(HF_PROJ)}"
      )
    names.add(name)
  return tuple(n for n in LORA_TARGETS if n in names)


_QWEN_IDS = dict(bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
_LLAMA3 = dict(
  family="llama", vocab_size=128256, d_model=4096, num_layers=32,
  num_heads=32, num_kv_heads=8, head_dim=128, d_ff=14336, rope_theta=5e5,
  norm_eps=1e-5, bos_token_id=128000,
)  # fmt: skip
# Named architectures: shapes and token ids of models we know, for sizing a
# model without its files (tools/memory.py, model.arch_name).
ARCHS: dict[str, ModelConfig] = {
  "smollm2_135m": ModelConfig(
    family="llama", vocab_size=49152, d_model=576, num_layers=30,
    num_heads=9, num_kv_heads=3, head_dim=64, d_ff=1536, rope_theta=1e5,
    norm_eps=1e-5, tie_embeddings=True, max_seq_len=8192,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
  ),
  "qwen3_0_6b": ModelConfig(
    family="qwen3", vocab_size=151936, d_model=1024, num_layers=28,
    num_heads=16, num_kv_heads=8, head_dim=128, d_ff=3072, rope_theta=1e6,
    tie_embeddings=True, qk_norm=True, max_seq_len=40960, **_QWEN_IDS,
  ),
  "qwen3_1_7b": ModelConfig(
    family="qwen3", vocab_size=151936, d_model=2048, num_layers=28,
    num_heads=16, num_kv_heads=8, head_dim=128, d_ff=6144, rope_theta=1e6,
    tie_embeddings=True, qk_norm=True, max_seq_len=40960, **_QWEN_IDS,
  ),
  "qwen3_8b": ModelConfig(
    family="qwen3", vocab_size=151936, d_model=4096, num_layers=36,
    num_heads=32, num_kv_heads=8, head_dim=128, d_ff=12288, rope_theta=1e6,
    qk_norm=True, max_seq_len=40960, **_QWEN_IDS,
  ),
  "qwen2_5_7b": ModelConfig(
    family="qwen2", vocab_size=152064, d_model=3584, num_layers=28,
    num_heads=28, num_kv_heads=4, head_dim=128, d_ff=18944, rope_theta=1e6,
    qkv_bias=True, max_seq_len=32768, **_QWEN_IDS,
  ),
  "llama3_8b": ModelConfig(
    **_LLAMA3, max_seq_len=8192, eos_token_id=128001
  ),
  "llama3_1_8b": ModelConfig(
    **_LLAMA3, rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0, rope_original_max_pos=8192,
    max_seq_len=131072, eos_token_id=(128001, 128008, 128009),
  ),
}  # fmt: skip


def named_arch(name: str, **overrides) -> ModelConfig:
  """``ARCHS[name]`` with ``overrides`` (dtypes, remat, LoRA, ...)."""
  if name not in ARCHS:
    raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHS)}")
  return ARCHS[name].replace(**overrides)
