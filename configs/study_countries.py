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

from configs import demo

ARMS = ("rlvr", "rlcr", "multi_rlvr", "multi_rlcr", "base")


def get_config(arg=None):
  arm = arg or "multi_rlcr"
  if arm not in ARMS:
    raise ValueError(f"configs/study_countries.py: argument in {ARMS}")
  c = demo.get_config()  # model, data, sampler, warm-up, RL and optimiser
  c.seed = 0
  c.steps = 0 if arm == "base" else 12
  c.sampler.max_new_tokens = 96  # the same limit for every format

  c.reward.mode = "multi_rlcr" if arm == "base" else arm
  c.reward.correctness = "count"
  c.reward.preset = "paper"
  c.reward.format_penalty = -1.0
  c.reward.confidence_sum_le_one = False  # several true answers at once

  c.ckpt.every_steps = 4
  c.ckpt.keep = 1
  c.eval.num_prompts = 24
  single = arm in ("rlvr", "rlcr")
  c.eval.num_generations = 6 if single else 2  # 6 answers per prompt
  c.eval.temperature = 1.0
  c.export.hf_dir = ""
  c.export.report = False
  c.log.tensorboard = False
  return c
