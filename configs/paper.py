"""Shared settings of the paper reproduction configs (Qwen3-8B on DDXPlus).

Reference hyperparameters (METHOD §5): G=32, 24 prompts per step, lr 1e-6,
warmup 5 %, temperature 0.7, top-p 1, prompts ≤ 3072 tokens, completions
≤ 1536, β=0, Dr.GRPO advantages, token-mean loss, ε=0.2, one epoch
(≈500 steps), seed 43.

Hardware (the config argument):
  v5p   TPU v5p-32 slice: 16 chips (4 hosts), mesh (data 1, fsdp 16,
        tensor 1), bf16 compute, remat=full. Compiled for v5p:2x2x4 on a
        CPU host (tools/aot.py; BENCHMARKS.md, "Compiled estimates"):
        sampling 42 GiB and update 17 GiB per chip of 95 (Multi-RLCR,
        model.attention=xla; splash 42 and 16).
  gpu8  one 8×H100/H200 80 GB host: mesh (1, 8, 1), bf16, remat=full,
        rollouts sampled 4 prompts (128 rows) at a time so the KV cache
        fits. Compiled for h100:8 (tools/aot.py, model.attention=cudnn):
        sampling 27 GiB and update 23 GiB per GPU, within the 56 GiB JAX
        preallocates (xla: 27 and 27).
"""

from configs import base

HARDWARE = {
  # mesh (data, fsdp, tensor), prompts per sampler call
  "v5p": ((1, 16, 1), 24),
  "gpu8": ((1, 8, 1), 4),
}


def get_paper_config(mode: str, hardware: str | None):
  hardware = hardware or "v5p"
  if hardware not in HARDWARE:
    raise ValueError(f"hardware must be one of {sorted(HARDWARE)}: {hardware}")
  (data, fsdp, tensor), chunk = HARDWARE[hardware]
  c = base.get_config()
  c.seed = 43
  c.steps = 500
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  c.model.path = "Qwen3-8B"  # a local HF directory: --config.model.path=DIR
  c.model.arch_name = "qwen3_8b"
  c.model.param_dtype = "float32"  # fp32 master weights
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.data.name = "multians_jsonl"
  c.data.jsonl = "ddxplus/train.jsonl,ddxplus/test.jsonl"  # prepare_data.py
  c.data.family = "ddx"
  c.data.prompts_per_step = 24
  c.data.max_prompt_len = 3072
  c.data.min_bucket = 256
  c.sampler.max_new_tokens = 1536
  c.sampler.temperature = 0.7
  c.sampler.top_p = 1.0
  c.sampler.cache_dtype = "bfloat16"
  c.reward.mode = mode
  c.reward.num_answers = 3 if mode.startswith("multi") else 1
  c.reward.correctness = "any"
  c.reward.preset = "reference"
  # A differential holds several true answers at once: the Σq ≤ 1 gate would
  # break properness (METHOD §3).
  c.reward.confidence_sum_le_one = False
  c.rl.num_generations = 32
  c.rl.advantage = "drgrpo"
  c.loss.agg = "token_mean"
  c.loss.kl_beta = 0.0
  c.rl.micro_batches = 48
  c.rl.sample_chunk = chunk
  c.optim.lr = 1e-6
  c.optim.warmup_frac = 0.05
  c.optim.schedule = "constant"
  c.ckpt.every_steps = 25
  c.eval.every_steps = 100
  c.eval.num_prompts = 500
  c.eval.num_generations = 4
  c.export.hf_dir = "hf"
  return c
