r"""Tiny random model on the countries task: tests and smoke runs (CPU).

  python -m multians_jax.main --config=configs/tiny.py --workdir=/tmp/tiny

A 2-layer random decoder with the SmolLM2 tokenizer; it learns nothing
useful, but runs every stage (sample, reward, update, checkpoint, eval) in
seconds.
"""

from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.steps = 4
  c.model.path = "random"
  c.model.tokenizer = "smollm2"
  c.model.arch.update(
    family="llama",
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    d_ff=64,
    vocab_size=49152,
    tie_embeddings=True,
  )
  c.data.prompts_per_step = 2
  c.data.max_prompt_len = 512
  c.data.min_bucket = 128
  c.sampler.max_new_tokens = 8
  c.sampler.temperature = 1.0
  c.rl.num_generations = 4
  c.rl.micro_batches = 2
  c.optim.lr = 1e-3
  c.optim.warmup_frac = 0.0
  c.ckpt.every_steps = 2
  c.eval.every_steps = 0
  c.eval.num_prompts = 4
  c.eval.num_generations = 2
  c.eval.before_after = False
  return c
