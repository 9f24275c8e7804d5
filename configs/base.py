"""Defaults shared by every experiment config (each field commented once).

Experiment files call ``base.get_config()`` and override what differs.
The values are ``multians_jax.config.RunConfig``'s defaults, key for key
(tests/test_config.py holds the two equal).
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 43  # PRNG seed of sampling and data order
  c.steps = 500  # optimizer steps to train

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # data-parallel replicas
  c.mesh.fsdp = -1  # parameter sharding (ZeRO-3); -1 = remaining devices
  c.mesh.tensor = 1  # tensor parallelism over heads / MLP / vocab

  c.model = ml_collections.ConfigDict()
  c.model.path = "smollm2"  # checkpoint / HF dir / .gguf / smollm2 / random
  c.model.arch_name = "smollm2_135m"  # model.ARCHS entry sizing tools/memory.py
  c.model.tokenizer = ""  # tokenizer source when path='random'
  c.model.arch = ml_collections.ConfigDict()  # ModelConfig overrides (random)
  c.model.param_dtype = "float32"  # float32 = fp32 master weights
  c.model.dtype = "float32"  # compute dtype (bfloat16 on TPU/GPU)
  c.model.remat = "none"  # none | full | dots
  # xla (default, everywhere) | cudnn (jax.nn.dot_product_attention: cuDNN
  # flash attention on GPU with a bfloat16 compute dtype) | splash (Pallas
  # splash attention, TPU). The fused kernels never hold the [T, S] scores.
  c.model.attention = "xla"
  c.model.lora_rank = 0  # > 0: train rank-r LoRA adapters alone (base frozen)
  c.model.lora_alpha = 16.0  # LoRA update scale = alpha / rank
  c.model.lora_targets = "all"  # projections: all, or e.g. "wq,wv" / "q_proj"

  c.data = ml_collections.ConfigDict()
  c.data.name = "countries"  # TFDS builder name (datasets.BUILDERS)
  c.data.data_dir = ""  # '' = WORKDIR/data (built on first use)
  c.data.jsonl = ""  # comma-separated files for multians_jsonl
  c.data.family = "qa"  # task family of the system prompt (qa|ddx|code)
  c.data.train_split = "train"  # split to train on
  c.data.eval_split = "test"  # held-out split for evaluation
  c.data.prompts_per_step = 24  # P prompts per optimizer step (all hosts)
  c.data.max_prompt_len = 512  # longer prompts are dropped and counted
  c.data.min_bucket = 64  # smallest padded prompt length

  c.sampler = ml_collections.ConfigDict()
  c.sampler.max_new_tokens = 1536  # completion length limit L
  c.sampler.temperature = 0.7  # sampling temperature (loss uses the same)
  c.sampler.top_p = 1.0  # nucleus sampling mass
  c.sampler.top_k = 0  # 0 = off
  c.sampler.cache_dtype = "float32"  # KV cache dtype (bfloat16 on TPU/GPU)
  # Rows decoded at once; a row that stops hands its slot (and its KV cache)
  # to the next (prompt, sample) of the rollout. 0 = one slot per row (the
  # static batch). Same samples either way; docs/GUIDE.md, "Sampling".
  c.sampler.slots = 0

  c.reward = ml_collections.ConfigDict()
  c.reward.mode = "multi_rlcr"  # multi_rlcr | multi_rlvr | rlcr | rlvr
  c.reward.num_answers = 3  # K answers per generation
  c.reward.correctness = "any"  # count | count_over_k | any
  c.reward.preset = "reference"  # paper | reference
  c.reward.require_distinct = True  # gate: answers pairwise distinct
  c.reward.confidence_sum_le_one = False  # gate: Σq ≤ 1 (single-truth tasks)
  c.reward.require_think = True  # a <think> block must come first
  c.reward.accept_percent = False  # '70%' → 0.7
  c.reward.format_penalty = 0.0  # paper preset: reward of a format failure
  c.reward.weights = (0.5, 0.5, 0.5)  # reference preset: format, acc, brier
  c.reward.matcher = "exact"  # exact | numeric | code | a matchers.Matcher

  c.warmup = ml_collections.ConfigDict()
  c.warmup.steps = 0  # supervised format warm-up steps before RL (0 = off)
  c.warmup.lr = 1e-4  # warm-up learning rate (AdamW, constant)
  c.warmup.max_target_len = 96  # warm-up target tokens
  c.warmup.batch_prompts = 8  # prompts per warm-up step
  c.warmup.answers = "gold"  # targets: gold answers | distribution (lab)
  c.warmup.confidences = "fixed"  # target confidences: fixed | random
  c.warmup.flatten = 0.5  # distribution targets: exponent τ of p
  c.warmup.distractor_weight = 0.05  # distribution targets: distractor w

  c.rl = ml_collections.ConfigDict()
  c.rl.num_generations = 32  # G completions per prompt
  # drgrpo | grpo | rloo | gdpo (each reward component normalised in its
  # group, summed with reward.weights, then scaled by the batch std) |
  # passk (PKPO: the policy gradient of pass@k / max@k of k samples, k =
  # rl.pass_k; for the single-answer baselines, METHOD.md §5)
  c.rl.advantage = "drgrpo"
  c.rl.pass_k = 0  # rl.advantage='passk': 2 <= k <= rl.num_generations
  c.rl.num_iterations = 1  # optimizer steps per rollout batch
  c.rl.micro_batches = 1  # gradient accumulation steps (exact)
  # > 0: instead of M equal micro-batches, groups sorted by their longest
  # completion and cut into micro-batches of at most this many decoder
  # positions, each at its own completion width (exact; METHOD.md §5)
  c.rl.micro_batch_tokens = 0
  # Pack each group's completions one after another into one row (each
  # token sees its prompt and its own completion; exact), so no completion
  # is padded to a longer one's width: the update's cost follows the real
  # tokens. Needs model.attention xla or cudnn (METHOD.md §5).
  c.rl.pack_completions = False
  c.rl.sample_chunk = 0  # prompts per sampler call (0 = all at once)
  # Update step: run each prompt through the decoder once per group of G
  # completions (or per part of a group in a micro-batch), not once per
  # completion. Same loss and gradient; False = the plain per-row layout.
  c.rl.share_prompt = True
  # Per-answer credit (docs/CREDIT.md): 'answer' gives the tokens of answer
  # and confidence span i slot i's own advantage; needs an additive
  # reward.correctness (count | count_over_k). 'decoupled': answer span i
  # takes the correctness parts of slots i..K, confidence span i its own
  # calibration part, each with its own group baseline.
  # sequence | answer | answer_to_go (slots i..K) | decoupled
  c.rl.credit = "sequence"
  c.rl.credit_baseline = "slot"  # slot (per slot index) | pooled (all slots)
  # An entropy bonus on the confidence spans' tokens alone (needs per-token
  # credit and confidences): β_C·(−log π_old) joins their advantages, a
  # sampled estimate of β_C·∇H; falls linearly to 0 by the decay step
  # (0 = constant). docs/CREDIT.md
  c.rl.conf_entropy_coef = 0.0
  c.rl.conf_entropy_decay_steps = 0
  # Decoupled credit: the confidence spans' advantages times this factor (a
  # step size of their own; the point they converge to is unchanged)
  c.rl.conf_adv_scale = 1.0
  # Dynamic sampling, set-aware: drop groups whose completions all reach a
  # gold answer or none does, refill with new prompts (at most
  # dynamic_max_rounds extra sampling rounds a step).
  c.rl.dynamic_sampling = False
  c.rl.dynamic_max_rounds = 3
  c.rl.logprob_chunk = 128  # positions whose logits exist at once
  c.rl.max_nonfinite = 5  # abort after this many non-finite steps in a row
  # abort after this many steps in a row without one well-formed completion
  # (every reward the format penalty: no reward signal left); 0 = never
  c.rl.max_unparsed_steps = 50

  # The clipped policy-gradient loss (METHOD §5).
  c.loss = ml_collections.ConfigDict()
  c.loss.kind = "ppo"  # ppo | gspo (sequence ratio) | cispo (truncated IS)
  c.loss.clip_eps_low = 0.2  # PPO clip below (CISPO: weight truncated below)
  c.loss.clip_eps_high = 0.2  # PPO clip above (CISPO: weight truncated above)
  c.loss.gspo_clip_low = 3e-4  # GSPO: sequence-ratio clip (needs
  c.loss.gspo_clip_high = 4e-4  # loss.agg = 'seq_mean_token_mean')
  c.loss.agg = "token_mean"  # token_mean | seq_mean_token_mean | ..._sum_norm
  c.loss.kl_beta = 0.0  # k3 KL weight against the initial policy
  c.loss.mask_truncated = False  # drop completions cut by the length limit
  # Entropy bonus: −β_H·H_t joins every counted token's loss (H_t the
  # sampler distribution's entropy at token t), aggregated as the loss is;
  # with entropy_decay_steps > 0 β_H falls linearly to 0 over those steps,
  # so training ends on the reward's own objective (METHOD.md §5).
  c.loss.entropy_coef = 0.0
  c.loss.entropy_decay_steps = 0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-6  # peak learning rate
  c.optim.schedule = "constant"  # constant | linear | cosine after warmup
  c.optim.warmup_frac = 0.05  # warmup steps as a fraction of steps
  c.optim.weight_decay = 0.0  # AdamW decay (not on norms)
  c.optim.b1 = 0.9  # Adam beta1
  c.optim.b2 = 0.999  # Adam beta2
  c.optim.grad_clip = 1.0  # global-norm clipping (0 = off)

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every_steps = 50  # save period (and on SIGTERM / at the end)
  c.ckpt.keep = 3  # checkpoints kept
  # zstd per chunk (~10 % smaller float weights); False: about the saved
  # bytes less host memory while saving
  c.ckpt.compress = True

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 100  # 0 = only before and after training
  c.eval.num_prompts = 64  # held-out prompts per evaluation
  c.eval.num_generations = 4  # generations pooled per prompt (k = n·K)
  c.eval.temperature = 0.7  # sampling temperature at evaluation
  c.eval.before_after = True  # evaluate at step 0 and at the end

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 1  # metrics.jsonl / TensorBoard period
  c.log.tensorboard = True  # write TensorBoard event files
  c.log.wandb_project = ""  # W&B project ('' = no W&B run; .[wandb] extra)
  c.log.wandb_entity = ""  # W&B team or user ('' = the default entity)
  c.log.wandb_mode = "online"  # online | offline | disabled

  c.export = ml_collections.ConfigDict()
  c.export.hf_dir = ""  # '' = no export; relative paths are under WORKDIR
  c.export.report = False  # write REPORT.md with plots at the end
  return c
