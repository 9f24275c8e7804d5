"""A small config in the experiment-config shape, for tests/test_memory.py."""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # v5p
  c.model = ml_collections.ConfigDict()
  c.model.path = "random"  # shapes from arch below
  c.model.arch_name = "qwen3_8b"  # used when arch is empty
  c.model.arch = ml_collections.ConfigDict(
    dict(family="qwen3", vocab_size=512, d_model=64, num_layers=2,
         num_heads=4, num_kv_heads=2, head_dim=16, d_ff=128, qk_norm=True)
  )  # fmt: skip
  c.model.param_dtype = "float32"  # master weights
  c.model.dtype = "float32"  # compute dtype
  c.model.remat = "none"  # none | full | dots
  c.data = ml_collections.ConfigDict()
  c.data.prompts_per_step = 2  # P
  c.data.max_prompt_len = 50  # bucketed to T = 64
  c.data.min_bucket = 16  # smallest prompt bucket
  c.sampler = ml_collections.ConfigDict()
  c.sampler.max_new_tokens = 64  # L
  c.sampler.cache_dtype = "float32"  # KV cache dtype
  c.rl = ml_collections.ConfigDict()
  c.rl.num_generations = 4  # G
  c.rl.micro_batches = 1  # M
  c.optim = ml_collections.ConfigDict(dict(lr=1e-6))  # AdamW
  return c
