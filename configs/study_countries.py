r"""The real-model study: SmolLM2-135M on `countries`, the four objectives.

  python tools/study.py --config=configs/study_countries.py \
      --arms=base,rlvr,rlcr,multi_rlvr,multi_rlcr --seeds=0,1 \
      --out=runs/countries --parallel=1 --export=study/countries

Argument: ``rlvr`` | ``rlcr`` | ``multi_rlvr`` | ``multi_rlcr`` | ``base``
(``base``: the Multi-RLCR warm-up alone). Every arm has the same budget:
the same prompts per step, generations per prompt, steps, completion
length limit and learning rate; each warms up (supervised, its own format,
random confidences) for the same number of steps first. Rewards are the
paper's (``count`` / ``paper``) with format failures at -1 (a valid wrong
RLCR completion scores in [-1, 0), so a penalty of 0 pays for breaking the
format: STUDY.md) and no Σq <= 1 gate (a `countries` question has several
true answers at once). Held-out: the test split, 6 answers per prompt (6
single-answer samples or 2 generations of 3). Sized for a 2-core CPU;
raise ``steps``, ``data.prompts_per_step`` and ``eval.num_prompts`` on an
accelerator.
"""

from configs import base

ARMS = ("rlvr", "rlcr", "multi_rlvr", "multi_rlcr", "base")


def get_config(arg=None):
  arm = arg or "multi_rlcr"
  if arm not in ARMS:
    raise ValueError(f"configs/study_countries.py: argument in {ARMS}")
  c = base.get_config()
  c.seed = 0
  c.steps = 0 if arm == "base" else 12
  c.model.path = "smollm2"
  c.data.name = "countries"
  c.data.prompts_per_step = 2
  c.data.max_prompt_len = 192
  c.data.min_bucket = 96
  c.sampler.max_new_tokens = 96  # the same limit for every format
  c.sampler.temperature = 1.0

  c.reward.mode = "multi_rlcr" if arm == "base" else arm
  c.reward.num_answers = 3
  c.reward.correctness = "count"
  c.reward.preset = "paper"
  c.reward.format_penalty = -1.0
  c.reward.confidence_sum_le_one = False  # several true answers at once
  c.reward.require_think = False  # a 135M model: answers without reasoning

  c.warmup.steps = 8
  c.warmup.lr = 5e-5
  c.warmup.batch_prompts = 8
  c.warmup.max_target_len = 96
  c.warmup.confidences = "random"  # calibration is left to RL

  c.rl.num_generations = 8
  c.optim.lr = 5e-6
  c.optim.warmup_frac = 0.0
  c.ckpt.every_steps = 4
  c.ckpt.keep = 1
  c.eval.every_steps = 0
  c.eval.num_prompts = 24
  single = arm in ("rlvr", "rlcr")
  c.eval.num_generations = 6 if single else 2  # 6 answers per prompt
  c.eval.temperature = 1.0
  c.log.tensorboard = False
  return c
