"""The measurements of ``tools/bench.py`` (which documents the cases, the
shapes and the FLOP conventions) and the pieces ``tools/bench_ab.py``
times in fresh processes: the machine, the matmul peak, the sampler, the
update step, one RL iteration, the reward path and the decode profile.

Shape letters: P prompts, G completions per prompt, B = P·G rows, T prompt
tokens, L new (completion) tokens, S = T + L sequence, M micro-batches.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from multians_jax import config, sharding, sources
from multians_jax.aot import profiling
from multians_jax.bench.reward import bench_reward
from multians_jax.bench.torch_ref import (
  TORCH_INPUTS,
  time_transformers,
  torch_update,
)
from multians_jax.interop import hf
from multians_jax.model import sampler
from multians_jax.model import transformer as model_lib
from multians_jax.rl import credit, reward, rollouts, update

FULL = {
  "sampler": dict(prompts=8, group=8, prompt_len=128, new_tokens=128),
  "train": dict(batch=64, seq=256, micro_batches=4, group=8),
  "rl": dict(prompts=2, group=4, prompt_len=64, new_tokens=64),
  "reward": dict(num=1024, chars=1000, k=3),
  "peak_n": 2048,
}
QUICK = {
  "sampler": dict(prompts=2, group=2, prompt_len=16, new_tokens=8),
  "train": dict(batch=4, seq=32, micro_batches=2, group=2),
  "rl": dict(prompts=2, group=2, prompt_len=16, new_tokens=8),
  "reward": dict(num=64, chars=300, k=3),
  "peak_n": 512,
}
TINY = model_lib.ModelConfig(
  "llama", 512, 64, 2, 4, 2, 16, 128, tie_embeddings=True,
  max_seq_len=1024, bos_token_id=1, eos_token_id=2, pad_token_id=2,
)  # fmt: skip


# ---------------------------------------------------------------------------
# Machine, peak, model


def machine() -> dict:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [ln.split(":", 1)[1].strip() for ln in f if "model name" in ln]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  import flax
  import torch
  import transformers

  return {
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "cpu": cpu,
    "cores": os.cpu_count(),
    "load_avg_1m": os.getloadavg()[0],
    "jax": jax.__version__,
    "flax": flax.__version__,
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "device": str(jax.devices()[0].device_kind),
  }


def _best(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return min(times)


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
  """FLOP/s of a jitted fp32 n×n matmul (best of ``reps``)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  jax.block_until_ready(f(a, b))
  return 2 * n**3 / _best(lambda: f(a, b), reps)


def load(name: str):
  """(model, tokenizer or None) on one device; ``tiny`` = random init."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  if name == "tiny":
    return model_lib.init_model(TINY, mesh, sharding.TRAIN_RULES), None
  model, _, tok = sources.load_model(name, mesh, sharding.TRAIN_RULES)
  return model, tok


def matmul_params(cfg: model_lib.ModelConfig) -> int:
  """N: parameters in matmuls per token (all, embedding once as LM head)."""
  n = model_lib.param_count(cfg)
  if not cfg.tie_embeddings:
    n -= cfg.vocab_size * cfg.d_model  # the lookup table is not a matmul
  return n


def _prompts(cfg, p: int, t: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(3, cfg.vocab_size, (p, t)).astype(np.int32)


# ---------------------------------------------------------------------------
# Sampler


def decode_flops(cfg, b: int, t: int, steps: int) -> float:
  """FLOPs of ``steps`` decode steps of B rows over S = T + L cache slots."""
  s = t + steps  # the sampler attends to every slot (masked)
  attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * s
  return float(b * steps * (2 * matmul_params(cfg) + attn))


def time_ours(model, ids, g: int, new: int, temperature: float) -> dict:
  """First-call (compile) and warm times of ``sampler.sample``."""
  mask = np.ones(ids.shape, bool)
  out = {}
  for steps in (new, 1):  # full run; prefill + 1 step (decode-only diff)
    cfg = sampler.SamplingConfig(
      max_new_tokens=steps, temperature=temperature, min_prompt_bucket=0
    )
    run = lambda c=cfg: (
      sampler.sample(
        model, ids, mask, jax.random.key(0), c, num_samples=g
      ).tokens
    )
    t0 = time.perf_counter()
    toks = jax.block_until_ready(run())
    out[steps] = dict(first=time.perf_counter() - t0, warm=_best(run, 2))
    if steps == new:
      out["distinct_rows"] = len({tuple(r) for r in np.asarray(toks)})
  return out


def bench_sampler(model, shapes: dict, peak: float, temperature=0.7) -> dict:
  cfg = model.cfg
  p, g = shapes["prompts"], shapes["group"]
  t, new = shapes["prompt_len"], shapes["new_tokens"]
  b = p * g
  ids = _prompts(cfg, p, t)
  ours = time_ours(model, ids, g, new, temperature)
  tokens = b * new
  decode_s = ours[new]["warm"] - ours[1]["warm"]
  flops = decode_flops(cfg, b, t, new - 1)
  with tempfile.TemporaryDirectory() as d:
    hf.save(model, d)
    hf_s, hf_new = _fresh(time_transformers, d, ids, g, new, temperature)
  ours_tps = tokens / ours[new]["warm"]
  hf_tps = b * hf_new / hf_s
  return {
    "shape": dict(prompts=p, group=g, rows=b, prompt_len=t, new_tokens=new),
    "temperature": temperature,
    "ours_compile_and_first_call_s": ours[new]["first"],
    "ours_warm_s": ours[new]["warm"],
    "ours_prefill_plus_1_step_s": ours[1]["warm"],
    "ours_decode_s": decode_s,
    "ours_tokens_per_s": ours_tps,
    "ours_distinct_rows": ours["distinct_rows"],
    "transformers_s": hf_s,
    "transformers_new_tokens": hf_new,
    "transformers_tokens_per_s": hf_tps,
    "ratio_vs_transformers": ours_tps / hf_tps,
    "decode_ms_per_step": 1e3 * decode_s / max(new - 1, 1),
    "decode_flops": flops,
    "decode_flop_per_s": flops / decode_s if decode_s > 0 else math.nan,
    "decode_fraction_of_peak": flops / decode_s / peak
    if decode_s > 0
    else math.nan,
  }


# ---------------------------------------------------------------------------
# Update step


def _rollout(cfg, b: int, t: int, n: int, group: int = 1, seed: int = 0):
  """Random rollout of b rows: b / group prompts, each continued by group
  rows (prompt-major, as ``sampler.sample`` returns them)."""
  rng = np.random.default_rng(seed)
  ids = lambda r, n: rng.integers(3, cfg.vocab_size, (r, n))
  prompts = ids(b // group, t)
  return sampler.Rollout(
    prompt_tokens=jnp.asarray(prompts, jnp.int32),
    prompt_mask=jnp.ones((b // group, t), bool),
    tokens=jnp.asarray(ids(b, n), jnp.int32),
    logprobs=jnp.asarray(-rng.random((b, n)) * 5, jnp.float32),
    mask=jnp.ones((b, n), bool),
    lengths=jnp.full((b,), n, jnp.int32),
    truncated=jnp.zeros((b,), bool),
  )


def _copy(model):
  """A model with its own buffers (the update step donates its state)."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def time_update(model, batch, micro: int, group: int) -> dict:
  tx = update.optimizer(update.OptimConfig(lr=1e-6))
  graphdef, _ = nnx.split(model)
  state = update.init_state(model, tx)
  ucfg = update.UpdateConfig(
    micro_batches=micro, temperature=0.7, group_size=group
  )
  step = lambda s: update.update_step(graphdef, s, batch, tx=tx, cfg=ucfg)
  t0 = time.perf_counter()
  state, m = jax.block_until_ready(step(state))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  state, m = jax.block_until_ready(step(state))
  return dict(first=first, warm=time.perf_counter() - t0, loss=float(m["loss"]))


def _fresh(fn, *args):
  """``fn(*args)`` in a fresh (spawned) process. A torch reference timed in
  this process runs far slower than on its own (``generate`` reached 12
  instead of ~150 tokens/s next to JAX's thread pool), and torch's freed
  activations would stay in this process's heap."""
  import concurrent.futures
  import multiprocessing

  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
    return pool.submit(fn, *args).result()


def time_torch_update(hf_dir, batch, micro: int, comp: int) -> float:
  """A transformers fwd + bwd (same PG loss shape) + AdamW step, warm, in
  a fresh process."""
  arrays = {k: np.asarray(getattr(batch, k)) for k in TORCH_INPUTS}
  return _fresh(torch_update, hf_dir, arrays, micro, comp)


def bench_update(model, shapes: dict, peak: float) -> dict:
  """Ours with shared prompts (the default, ``group_size = G``) and in the
  plain per-row layout (the same computation as transformers), against
  transformers, on the same grouped batch."""
  cfg = model.cfg
  b, s, micro = shapes["batch"], shapes["seq"], shapes["micro_batches"]
  g = shapes["group"]
  t = n = s // 2
  rollout = _rollout(cfg, b, t, n, group=g)
  adv = jnp.asarray(np.random.default_rng(1).standard_normal(b), jnp.float32)
  batch = update.make_batch(rollout, adv)
  with tempfile.TemporaryDirectory() as d:
    hf.save(model, d)  # before the donating update step
    hf_s = time_torch_update(d, batch, micro, n)
  plain = time_update(_copy(model), batch, micro, 1)
  shared = time_update(_copy(model), batch, micro, g)
  flops = 6.0 * matmul_params(cfg) * b * s
  return {
    "shape": dict(
      batch=b, seq=s, prompt=t, completion=n, micro_batches=micro, group=g
    ),
    "ours_compile_and_first_step_s": shared["first"],
    "ours_step_s": shared["warm"],
    "ours_tokens_per_s": b * s / shared["warm"],
    "ours_mfu": flops / shared["warm"] / peak,
    "ours_plain_compile_and_first_step_s": plain["first"],
    "ours_plain_step_s": plain["warm"],
    "ours_plain_tokens_per_s": b * s / plain["warm"],
    "ours_plain_mfu": flops / plain["warm"] / peak,
    "transformers_step_s": hf_s,
    "transformers_tokens_per_s": b * s / hf_s,
    "transformers_mfu": flops / hf_s / peak,
    "ratio_vs_transformers": hf_s / shared["warm"],
    "ratio_plain_vs_transformers": hf_s / plain["warm"],
    "loss_shared_minus_plain": shared["loss"] - plain["loss"],
    "model_flops_per_step": flops,
  }


# ---------------------------------------------------------------------------
# One RL iteration


class _IdTokenizer:
  """The random ``tiny`` model's stand-in tokenizer: ids as text."""

  def batch_decode(self, ids, skip_special_tokens=True):
    del skip_special_tokens
    return [" ".join(map(str, r)) for r in ids]


def rl_iteration(model, tok, shapes: dict) -> dict:
  """Sample → reward → advantages → update; second (warm) iteration timed."""
  cfg = model.cfg
  p, g = shapes["prompts"], shapes["group"]
  ids = _prompts(cfg, p, shapes["prompt_len"], seed=2)
  mask = np.ones(ids.shape, bool)
  stop_ids, pad_id = config.stop_and_pad(cfg)
  scfg = sampler.SamplingConfig(
    max_new_tokens=shapes["new_tokens"],
    temperature=0.7,
    stop_ids=stop_ids,
    pad_id=pad_id,
    min_prompt_bucket=0,
  )
  rcfg = reward.RewardConfig(mode="multi_rlcr", num_answers=3)
  gold, tests = [[["France"], ["Spain"]]] * p, [[]] * p
  tx = update.optimizer(update.OptimConfig(lr=1e-6))
  graphdef, _ = nnx.split(model)
  state = update.init_state(_copy(model), tx)
  ucfg = update.UpdateConfig(temperature=0.7, group_size=g)
  times = []
  for it in range(2):
    t0 = time.perf_counter()
    policy = nnx.merge(graphdef, state.params)
    roll = sampler.sample(policy, ids, mask, jax.random.key(it), scfg, g)
    jax.block_until_ready(roll)
    t1 = time.perf_counter()
    # the training loop's scoring and advantages (rollouts, credit)
    rw = rollouts.score_rollout(
      tok or _IdTokenizer(), roll, gold, tests, rcfg, g
    )
    adv, _ = credit.rollout_advantages(
      rw.scores, p, kind="drgrpo", credit="sequence"
    )
    t2 = time.perf_counter()
    batch = update.make_batch(roll, adv)
    state, m = update.update_step(graphdef, state, batch, tx=tx, cfg=ucfg)
    jax.block_until_ready(m)
    t3 = time.perf_counter()
    times.append(dict(sampling_s=t1 - t0, reward_s=t2 - t1, update_s=t3 - t2))
  return {
    "shape": dict(shapes),
    "first_iteration": times[0],  # includes compilation
    "warm_iteration": times[1],
    "warm_total_s": sum(times[1].values()),
  }


def bench_train(model, tok, shapes: dict, peak: float) -> dict:
  out = bench_update(model, shapes["train"], peak)
  out["rl_iteration"] = rl_iteration(model, tok, shapes["rl"])
  return out


def bench_reward_path(shapes: dict) -> dict:
  return bench_reward(**shapes["reward"])


# ---------------------------------------------------------------------------
# Decode-step profile (multians_jax/aot/profiling.py)


def profile_decode(model, shapes: dict, steps: int = 32) -> dict:
  """``profiling.profile_decode`` at the sampler shape (random prompts)."""
  ids = _prompts(model.cfg, shapes["prompts"], shapes["prompt_len"])
  return profiling.profile_decode(model, ids, shapes["group"], steps)


# ---------------------------------------------------------------------------


def run(which: str, quick: bool = False, model_name: str = "smollm2") -> dict:
  shapes = QUICK if quick else FULL
  out = {"machine": machine(), "command": " ".join(sys.argv), "quick": quick}
  needs_model = which in ("sampler", "train", "profile", "all")
  if needs_model:
    out["matmul_peak_flop_per_s"] = matmul_peak(shapes["peak_n"])
    model, tok = load(model_name)
    out["model"] = dict(
      name=model_name,
      params=model_lib.param_count(model.cfg),
      matmul_params=matmul_params(model.cfg),
    )
  if which in ("sampler", "all"):
    out["sampler"] = bench_sampler(model, shapes["sampler"], out[
      "matmul_peak_flop_per_s"])  # fmt: skip
  if which in ("train", "all"):
    out["train"] = bench_train(
      model, tok, shapes, out["matmul_peak_flop_per_s"]
    )
  if which in ("reward", "all"):
    out["reward"] = bench_reward_path(shapes)
  if which in ("profile", "all"):
    out["profile"] = profile_decode(model, shapes["sampler"])
  return out
