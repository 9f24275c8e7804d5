r"""The distributional lab: every objective against its known optimum (CPU).

  python -m multians_jax.main --config=configs/lab.py:multi_rlvr \
      --workdir=runs/lab/multi_rlvr_s0 --config.seed=0

Argument: ``rlvr`` | ``rlcr`` | ``multi_rlvr`` | ``multi_rlcr`` | ``base``
| ``rlvr_pass3`` (``base``: the Multi-RLCR warm-up alone, no RL step: the
starting point the arms are compared with; ``rlvr_pass3``: single-answer
RLVR trained for pass@3 of 3 samples, PKPO advantages, the baseline a
K = 3 set is compared with). Task ``distlab``: 8 cases, each with a hidden
answer distribution p(·|q) over 6 diagnoses; each record's gold answer is
one draw from it. A tiny random decoder with the lab's word-level
tokenizer (one token per answer or confidence block) gets a broad prior
from a supervised warm-up on answers drawn from a flattened p with
confidences independent of correctness, then trains with the paper's
rewards (``count`` / ``paper``, Σq <= 1 gate: one true answer per record).
``multi_rlcr`` trains a 4-layer d = 128 decoder with decoupled credit
(confidence advantages x 10) and an entropy bonus that decays to 0 by
step 3,000 of 4,000 (the others:
2 layers, d = 64, 2,000 steps): with the smaller decoder its set stalls
at half the top-K mass (STUDY.md §1). A run takes a few minutes on 2 CPU
cores. Compare the arms with
``tools/compare.py`` (STUDY.md). Why a tiny model and not SmolLM2: the
optimum only shows after a few thousand group-relative updates, which a
135M model cannot take on this CPU in minutes; the lab tests the RL, and
every completion still goes through the real parser, matcher, reward
kernel, advantages and update step.
"""

from configs import base

ARMS = ("rlvr", "rlcr", "multi_rlvr", "multi_rlcr", "base", "rlvr_pass3")


def get_config(arg=None):
  arm = arg or "multi_rlcr"
  if arm not in ARMS:
    raise ValueError(f"configs/lab.py: argument must be one of {ARMS}")
  c = base.get_config()
  c.seed = 0
  c.steps = 0 if arm == "base" else 2000
  c.model.path = "random"
  c.model.tokenizer = "distlab"  # the lab's word-level tokenizer
  c.model.arch.update(
    family="llama",
    d_model=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    d_ff=128,
    vocab_size=384,  # >= the lab tokenizer's 383 tokens
    tie_embeddings=True,
  )
  if arm == "multi_rlcr":  # STUDY.md §1, "Reaching the optimum"
    # K answers with K calibrated confidences: a 4-layer d = 128 decoder
    # (the 2 x 64 one stalls at coverage 0.47), decoupled credit with the
    # confidences' advantages x 10 (their Brier signal is ~100x smaller
    # than the answers'), and an entropy bonus that falls to 0 by step
    # 3,000 of 4,000, so the run ends on the paper's objective.
    c.model.arch.update(d_model=128, num_layers=4, d_ff=256, head_dim=32)
    c.steps = 4000
    c.rl.credit = "decoupled"
    c.rl.conf_adv_scale = 10.0
    c.loss.entropy_coef = 0.05
    c.loss.entropy_decay_steps = 3000
  c.data.name = "distlab"
  c.data.family = "ddx"
  c.data.prompts_per_step = 8  # P
  c.data.max_prompt_len = 32
  c.data.min_bucket = 16
  c.sampler.max_new_tokens = 10  # multi_rlcr: 7 blocks + end of sequence
  c.sampler.temperature = 1.0

  c.reward.mode = {"base": "multi_rlcr", "rlvr_pass3": "rlvr"}.get(arm, arm)
  c.reward.num_answers = 3  # K
  c.reward.correctness = "count"  # paper: r_acc = D
  c.reward.preset = "paper"  # R = r_acc - B
  c.reward.confidence_sum_le_one = True  # one true answer per record
  c.reward.require_think = False  # no reasoning tokens in the lab
  # A valid but wrong RLCR completion scores in [-1, 0): with the default
  # penalty 0, breaking the format pays (STUDY.md); -1 never does.
  c.reward.format_penalty = -1.0

  c.warmup.steps = 600
  c.warmup.lr = 1e-3
  c.warmup.batch_prompts = 32
  c.warmup.max_target_len = 10
  c.warmup.answers = "distribution"  # flattened p: a broad prior
  c.warmup.confidences = "random"  # calibration is left to RL
  c.warmup.flatten = 0.5
  c.warmup.distractor_weight = 0.01

  c.rl.num_generations = 16  # G
  c.rl.advantage = "drgrpo"
  if arm == "rlvr_pass3":  # PKPO: the policy gradient of pass@3
    c.rl.advantage = "passk"
    c.rl.pass_k = 3
  c.optim.lr = 3e-4
  c.optim.warmup_frac = 0.0

  c.ckpt.every_steps = 100
  c.ckpt.keep = 1
  c.eval.every_steps = 0
  c.eval.num_prompts = 64  # the whole test split (8 patients per case)
  # 30 answers per prompt: 30 samples, or 30 / K generations of K answers.
  single = arm in ("rlvr", "rlcr", "rlvr_pass3")
  c.eval.num_generations = 30 if single else 30 // c.reward.num_answers
  c.eval.temperature = 1.0  # the policy as trained
  c.log.every_steps = 10  # keeps metrics.jsonl small enough to commit
  c.log.tensorboard = False
  return c
