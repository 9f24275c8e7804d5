r"""Qwen3-1.7B, Multi-RLCR (K=3) on `countries`, one 80 GB GPU (H100/A100).

  pip install -e ".[cuda12]"
  python -m multians_jax.main --config=configs/qwen3_1_7b_gpu.py \
      --workdir=runs/qwen3_1_7b --config.model.path=/path/to/Qwen3-1.7B

bf16 compute with fp32 master weights (≈ 1.7 B × 16 bytes = 27 GB for
params + AdamW + gradients), bf16 KV cache, remat of decoder layers.
Compiled for one H100 (python tools/aot.py --config=configs/qwen3_1_7b_gpu.py
--topology=h100:1 --config.model.attention=cudnn): sampling 50.6 GiB and
update 39.3 GiB, within the 55.9 GiB JAX preallocates by default. Planner:
python tools/memory.py --config=configs/qwen3_1_7b_gpu.py --device=h100
"""

from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.steps = 200
  c.mesh.fsdp = 1
  c.model.path = "Qwen3-1.7B"  # a local HF directory
  c.model.arch_name = "qwen3_1_7b"
  c.model.param_dtype = "float32"
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.data.name = "countries"
  c.data.prompts_per_step = 16
  c.data.max_prompt_len = 512
  c.data.min_bucket = 128
  c.sampler.max_new_tokens = 512
  c.sampler.cache_dtype = "bfloat16"
  c.reward.mode = "multi_rlcr"
  c.rl.num_generations = 16
  c.rl.micro_batches = 8
  c.optim.lr = 1e-6
  c.eval.every_steps = 50
  c.export.hf_dir = "hf"
  return c
