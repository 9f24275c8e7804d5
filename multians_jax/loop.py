"""The RL training loop: sample → reward → advantage → update → log → save.

``RunConfig`` (``config.py``) is the typed, validated form of an
experiment config (the ``ConfigDict`` stops in ``main.py``).
``train(run, workdir)`` resumes from the latest complete checkpoint in
``WORKDIR/checkpoints`` when there is one (falling back to older steps if
the latest cannot be restored), saves on SIGTERM/SIGINT and exits cleanly,
and evaluates before and after.

Multi-process (one process per host, ``jax.distributed``): every process
reads the same global prompt stream (so batches, bucket lengths and the
data-iterator state saved with a checkpoint do not depend on the number of
processes) and passes the same host arrays to jitted code over the global
mesh. The host work on completions — decoding and reward matching, the
expensive part — is split: each process handles its own whole groups of
rows (``sharding.row_bounds``, read from its addressable shards) and the
numeric scores are all-gathered, so advantages and logged metrics are
computed from every row, identically on every process. A run therefore
gives the same results (up to the summation order of cross-process
reductions) for any process count on the same mesh shape. Only process 0
writes logs, metrics, reports and exports; checkpoints are written
collectively by Orbax.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from flax import nnx

from multians_jax import (
  card,
  checkpoint,
  credit,
  data,
  datasets,
  evaluate,
  hf,
  lora,
  metrics,
  report,
  rollouts,
  sharding,
  telemetry,
)
from multians_jax import model as model_lib
from multians_jax import train as train_lib
from multians_jax import warmup as warmup_lib
from multians_jax.config import DataConfig, ModelSource, RunConfig

# ---------------------------------------------------------------------------
# Set-up


def load_policy(src: ModelSource, mesh, seed: int, tokenizer=None):
  """(model, tokenizer) from the configured source, in training sharding.

  With ``model.lora_rank`` > 0 the policy is the source + fresh adapters
  (a source that already holds different adapters has them merged first);
  a source with the same adapter shape (a LoRA run's checkpoint) is used
  as it is.
  """
  over = dict(param_dtype=src.param_dtype, dtype=src.dtype, remat=src.remat)
  if src.path == "random":
    if tokenizer is None and not src.tokenizer:
      raise ValueError("config: model.tokenizer is required with path=random")
    tok = tokenizer or checkpoint.load_any_tokenizer(src.tokenizer)
    cfg = model_lib.ModelConfig(**{**dict(src.arch), **over})
    m = model_lib.init_model(cfg, mesh, sharding.TRAIN_RULES, seed=seed)
  else:
    m, _, tok = checkpoint.load_model(
      src.path, mesh, sharding.TRAIN_RULES, **over
    )
    if tok is None:
      raise ValueError(f"model {src.path} has no tokenizer: RL needs one")
  want = lora.settings(src)
  if m.cfg.lora_rank and lora.settings(m.cfg) != want:
    m = lora.merge(m)
  if want and not m.cfg.lora_rank:
    m = lora.add(m, *want, seed=seed)
  return m, tok


def open_data(dc: DataConfig, workdir: str, split: str):
  """Builds the dataset on first use and opens ``split``."""
  data_dir = os.path.abspath(dc.data_dir or os.path.join(workdir, "data"))
  kwargs = {}
  if dc.jsonl:
    kwargs = {
      "jsonl": [p.strip() for p in dc.jsonl.split(",") if p.strip()],
      "family": dc.family,
    }
  name, _, config = dc.name.partition("/")
  if config:
    kwargs["config"] = config
  # Process 0 builds first (a shared data_dir is built once); the others
  # then find it built, or build their own copy on a host-local disk.
  if jax.process_index() == 0:
    datasets.build(name, data_dir, **kwargs)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("multians_jax data built")
    if jax.process_index() != 0:
      datasets.build(name, data_dir, **kwargs)
  return datasets.load(dc.name, split, data_dir)


# ---------------------------------------------------------------------------
# The loop


class _Stop:
  """SIGTERM / SIGINT → finish the step, save, exit cleanly."""

  def __init__(self):
    self.requested = False
    self._old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d: saving a checkpoint and stopping", signum)
    self.requested = True

  def restore(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def train(
  run: RunConfig,
  workdir: str,
  *,
  train_source=None,
  eval_source=None,
  tokenizer=None,
) -> dict:
  """Trains; returns the final metrics (and eval summaries)."""
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(*run.mesh.shape)
  policy, tok = load_policy(run.model, mesh, run.seed, tokenizer)
  tok = tokenizer or tok
  graphdef = nnx.graphdef(policy)
  tx = train_lib.optimizer(run.optim_config)
  ckpt = checkpoint.Checkpointer(
    os.path.join(workdir, "checkpoints"), max_to_keep=run.ckpt.keep
  )
  state = train_lib.init_state(policy, tx)
  if run.data.prompts_per_step % jax.process_count():
    raise ValueError(
      f"config: data.prompts_per_step={run.data.prompts_per_step} must be a "
      f"multiple of the process count {jax.process_count()}"
    )
  pcfg = data.PipelineConfig(  # the global stream, the same on every process
    batch_size=run.data.prompts_per_step,
    mode=run.reward.mode,
    num_answers=run.reward.num_answers,
    max_prompt_len=run.data.max_prompt_len,
    min_bucket=run.data.min_bucket,
    seed=run.seed,
  )
  source = train_source or open_data(run.data, workdir, run.data.train_split)
  stream = data.PromptIterator(source, tok, pcfg)
  ref_of = None
  if run.loss.kl_beta > 0:  # from the source, before resuming
    ref_of = _reference(run, mesh, tok, state.params)
  _check_same_adapters(ckpt.path, policy.cfg)
  state, meta = _resume(ckpt, state, graphdef, tx, mesh, stream)
  start = int(state.step)
  if jax.process_index() == 0:  # rows after the checkpoint are redone
    telemetry.truncate_after(os.path.join(workdir, "metrics.jsonl"), start)
  writer = telemetry.Writer(
    workdir,
    run.log.tensorboard,
    wandb_project=run.log.wandb_project,
    wandb_entity=run.log.wandb_entity,
    wandb_mode=run.log.wandb_mode,
    config=run.to_dict(),  # the W&B run config
  )
  stop_ids = tuple(policy.cfg.eos_ids) or (tok.eos_token_id,)
  pad_id = policy.cfg.pad_token_id if policy.cfg.pad_token_id is not None else 0
  # The data pipeline already buckets prompt lengths (data.min_bucket · 2^n).
  scfg = dataclasses.replace(
    run.sampling, stop_ids=stop_ids, pad_id=pad_id, min_prompt_bucket=0
  )
  evals = {}
  eval_records = None
  if run.eval.before_after or run.eval.every_steps:
    eval_records = list(
      _take(
        eval_source or open_data(run.data, workdir, run.data.eval_split),
        run.eval.num_prompts,
      )
    )

  def do_eval(tag, step):
    model = nnx.merge(graphdef, state.params)
    res = evaluate.run(
      model,
      tok,
      eval_records,
      run.reward,
      run.eval_config,
      seed=run.eval_seed,
      mesh=mesh,
      stop_ids=stop_ids,
      pad_id=pad_id,
    )
    writer.write(step, res.summary, prefix="eval/")
    keep_eval(tag, step, res)
    return res

  def keep_eval(tag, step, res):
    evals[tag] = res
    if writer.active:  # process 0: WORKDIR/eval/<tag>.json (tools/compare.py)
      evaluate.write_json(
        os.path.join(workdir, "eval", f"{tag}.json"),
        res,
        tag=tag,
        step=step,
        mode=run.reward.mode,
        num_answers=run.reward.num_answers,
        seed=run.seed,
        num_generations=run.eval.num_generations,
      )

  if run.eval.before_after and start == 0:
    do_eval("before", 0)
  if run.warmup.steps and start == 0 and not meta:  # not yet warmed up
    params = _warmup(run, graphdef, state.params, source, tok, writer)
    state = train_lib.init_state(nnx.merge(graphdef, params), tx)
    if run.eval.before_after:
      do_eval("warmup", 0)
    if run.steps == 0:  # the warmed-up model is the result
      _save(ckpt, 0, graphdef, state, stream, tok, run)
  stop = _Stop()
  key = jax.random.key(run.seed)
  bar = tqdm.tqdm(
    total=run.steps,
    initial=start,
    disable=not writer.active,
    dynamic_ncols=True,
    desc="train",
  )
  last = {}
  try:
    for step in range(start, run.steps):
      batch = next(stream)
      state, last = _rl_step(
        run,
        graphdef,
        tx,
        state,
        batch,
        tok,
        scfg,
        jax.random.fold_in(key, step),
        mesh,
        ref_of,
        stream=stream,
      )
      if int(state.skipped) >= run.rl.max_nonfinite:
        raise FloatingPointError(
          f"{int(state.skipped)} non-finite updates in a row at step {step}:"
          " lower optim.lr, check the data, or raise rl.max_nonfinite"
        )
      last.update(data_dropped=stream.num_dropped, step=step + 1)
      if (step + 1) % run.log.every_steps == 0:
        writer.write(step + 1, last)
      bar.update(1)
      bar.set_postfix(
        reward=f"{last['reward/total']:.3f}",
        fmt=f"{last['format_valid_rate']:.2f}",
        loss=f"{last['loss']:.4f}",
      )
      final = step + 1 == run.steps
      if stop.requested or final or (step + 1) % run.ckpt.every_steps == 0:
        _save(ckpt, step + 1, graphdef, state, stream, tok, run)
      every = run.eval.every_steps
      if every and (step + 1) % every == 0 and not final:
        do_eval(f"step{step + 1}", step + 1)
      if stop.requested:
        ckpt.wait()
        logging.warning("stopped at step %d (checkpoint saved)", step + 1)
        writer.close()
        return {"stopped_at": step + 1, **last}
  except BaseException:
    writer.close()  # the W&B run ends too (the finally below saves)
    raise
  finally:
    stop.restore()
    bar.close()
    ckpt.wait()
  if run.eval.before_after:
    if run.steps == 0 and "warmup" in evals:
      keep_eval("after", 0, evals["warmup"])  # the same model
    else:
      do_eval("after", run.steps)
  _finish(run, workdir, graphdef, state, tok, evals)
  if run.export.report:  # the report's plots, to the W&B run if there is one
    for d in [workdir, *sorted(glob.glob(os.path.join(workdir, "eval_*")))]:
      sub = "" if d == workdir else os.path.basename(d) + "/"
      pngs = sorted(glob.glob(os.path.join(d, "*.png")))
      writer.log_files(pngs, step=run.steps, prefix=f"report/{sub}")
  writer.close()
  ckpt.close()
  out = {"final": last}
  out.update({k: v.summary for k, v in evals.items()})
  return out


def _warmup(run, graphdef, params, source, tok, writer):
  """Supervised format warm-up on training questions (see warmup.py)."""
  wc = run.warmup
  pcfg = data.PipelineConfig(  # global batches, the same on every process
    batch_size=wc.batch_prompts,
    mode=run.reward.mode,
    num_answers=run.reward.num_answers,
    max_prompt_len=run.data.max_prompt_len,
    min_bucket=run.data.min_bucket,
    seed=run.seed + 7,
  )
  it = data.PromptIterator(source, tok, pcfg)
  tx = warmup_lib.optimizer(wc)
  opt_state = jax.jit(tx.init)(lora.partition(params)[0])
  for i in tqdm.trange(wc.steps, desc="warm-up", disable=not writer.active):
    b = warmup_lib.make_batch(
      next(it),
      tok,
      run.reward.mode,
      run.reward.num_answers,
      wc.max_target_len,
      seed=run.seed + i,
      cfg=wc,
    )
    params, opt_state, value = warmup_lib.sft_step(
      graphdef, params, opt_state, *b, tx=tx, chunk=run.rl.logprob_chunk
    )
    writer.write(0, {"warmup/loss": value, "warmup/step": i + 1})
  return params


def _take(source, n):
  for i in range(min(n, len(source))):
    yield source[i]


def _rl_step(run, graphdef, tx, state, batch, tok, scfg, key, mesh, ref_of,
             stream=None):  # fmt: skip
  """One RL iteration; returns (state, metrics).

  With ``rl.dynamic_sampling`` further batches are drawn from ``stream``
  (``rollouts.dynamic_fill``). The reward and length metrics describe the
  first batch, what the policy does on the data stream, so they read the
  same with dynamic sampling on or off.
  """
  t0 = time.perf_counter()
  g = run.rl.num_generations
  model = nnx.merge(graphdef, state.params)
  first = rollouts.sample_and_score(run, model, batch, tok, scfg, key, mesh)
  scored, live, dinfo = first, None, {}
  if run.rl.dynamic_sampling:

    def more(r):
      k = jax.random.fold_in(key, 1_000_003 * r)
      return rollouts.sample_and_score(
        run, model, next(stream), tok, scfg, k, mesh
      )

    scored, live, dinfo = rollouts.dynamic_fill(
      first, more, g, run.rl.dynamic_max_rounds
    )
  lengths, truncated = first.rewards.lengths, first.rewards.truncated
  adv, ainfo = credit.rollout_advantages(  # host value, equal everywhere
    scored.rewards.scores,
    len(batch.gold),
    token_slot=scored.rewards.token_slot,
    kind=run.rl.advantage,
    credit=run.rl.credit,
    baseline=run.rl.credit_baseline,
    reward_cfg=run.reward,
  )
  if live is not None:  # filler groups: no gradient
    adv = adv * (live[:, None] if adv.ndim == 2 else live)
  ainfo.update(dinfo)
  rollout = scored.rollout
  t1 = t0 + scored.seconds[0]  # sampling, every round
  t2 = time.perf_counter()
  ub = train_lib.place_batch(train_lib.make_batch(rollout, adv), mesh)
  ucfg = train_lib.UpdateConfig(
    loss=run.loss,
    micro_batches=run.rl.micro_batches,
    temperature=max(run.sampler.temperature, 1e-6),
    logprob_chunk=run.rl.logprob_chunk,
    group_size=g if run.rl.share_prompt else 1,
  )
  with sharding.activate(mesh, sharding.TRAIN_RULES):
    if run.rl.num_iterations > 1:  # π_old = the policy that sampled, exactly
      ub = ub.replace(
        old_logp=train_lib.completion_logprobs(graphdef, state.params, ub, ucfg)
      )
    if ref_of is not None:
      ref = ref_of(state.params)
      ub = ub.replace(
        ref_logp=train_lib.completion_logprobs(graphdef, ref, ub, ucfg)
      )
    for _ in range(run.rl.num_iterations):
      state, um = train_lib.update_step(graphdef, state, ub, tx=tx, cfg=ucfg)
  um = jax.device_get(um)
  t3 = time.perf_counter()
  out = metrics.summarize(first.rewards.scores, lengths, group_size=g)
  out.update({k: float(v) for k, v in um.items()})
  out.update(
    {k if "/" in k else f"adv/{k}": float(v) for k, v in ainfo.items()}
  )
  n_tok = float(np.sum(lengths))
  out.update(
    time_sample=t1 - t0,
    time_reward=t2 - t1,
    time_update=t3 - t2,
    time_step=t3 - t0,
    tokens_per_sec=n_tok / max(first.seconds[0], 1e-9),
    truncation_rate=float(np.mean(truncated)),
    lr=float(train_lib.schedule(run.optim_config)(int(state.step) - 1)),
  )
  return state, out


def _check_same_adapters(path: str, cfg) -> None:
  """A WORKDIR's checkpoints were written with the run's LoRA settings: a
  resume with other ones would not restore (rank, targets) or would train
  with a scale the saved model config does not record (alpha)."""
  if not checkpoint.is_checkpoint(path):
    return
  have = lora.settings(checkpoint.read_model_config(path))
  want = lora.settings(cfg)
  if have != want:
    show = lambda x: f"LoRA (rank, alpha, targets) = {x}" if x else "no LoRA"
    raise ValueError(
      f"config: the checkpoints in {path} were written with {show(have)}, "
      f"this run asks for {show(want)}; use the same model.lora_* or a new "
      "WORKDIR"
    )


def _reference(run, mesh, tok, initial):
  """The frozen initial policy (for the KL term) as a function of the
  current parameters. ``initial``: the policy's parameters as loaded from
  the source, before any update. Under LoRA it is the current (frozen)
  base with a copy of the initial adapters, zero B unless the source held
  trained ones (no second copy of the weights; combined fresh each step,
  since the update step donates the policy's arrays); else the source is
  reloaded once."""
  if lora.has_adapters(initial):
    adapters = jax.tree.map(jnp.copy, lora.partition(initial)[0])
    return lambda params: lora.combine(adapters, lora.partition(params)[1])
  ref, _ = load_policy(run.model, mesh, run.seed, tokenizer=tok)
  fixed = nnx.state(ref, nnx.Param)
  return lambda _: fixed


def _save(ckpt, step, graphdef, state, stream, tok, run):
  model = nnx.merge(graphdef, state.params)
  ckpt.save(
    step,
    model,
    tokenizer=tok,
    meta={"data_state": stream.get_state(), "seed": run.seed},
    items={
      "opt_state": state.opt_state,
      "train": {"step": state.step, "skipped": state.skipped},
    },
  )


def _resume(ckpt, state, graphdef, tx, mesh, stream) -> tuple[Any, dict]:
  """Restores the newest restorable step; older ones if the newest fails."""
  steps = ckpt.steps()
  abstract = lambda t: jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), t
  )
  for step in reversed(steps):
    try:
      model, meta, items = ckpt.restore(
        mesh,
        sharding.TRAIN_RULES,
        step=step,
        items={
          "opt_state": abstract(state.opt_state),
          "train": abstract({"step": state.step, "skipped": state.skipped}),
        },
      )
    except Exception as e:  # noqa: BLE001 - any unreadable step falls back
      logging.warning(
        "checkpoint step %d unreadable (%s: %s); trying an older one",
        step,
        type(e).__name__,
        e,
      )
      continue
    for bad in [s for s in steps if s > step]:
      where = ckpt.quarantine(bad)
      logging.warning("moved unreadable checkpoint step %d to %s", bad, where)
    stream.set_state(meta["data_state"])
    t = items["train"]
    state = train_lib.TrainState(
      t["step"], nnx.state(model, nnx.Param), items["opt_state"], t["skipped"]
    )
    logging.info("resumed from step %d", step)
    return state, meta
  if steps:
    logging.warning("no restorable checkpoint in %s: starting fresh", ckpt.path)
  return state, {}


def _finish(run, workdir, graphdef, state, tok, evals):
  params = state.params
  if run.export.hf_dir and jax.process_count() > 1:  # collective: all processes
    params = jax.tree.map(sharding.host_array, params)
  if jax.process_index() != 0:
    return
  if run.export.hf_dir:
    out = os.path.join(workdir, run.export.hf_dir)
    policy = nnx.merge(graphdef, params)
    hf.save(policy, out, tokenizer=tok)
    # main.py's config.json; evaluations of earlier sessions of a resumed run
    run_config, earlier, _ = card.from_workdir(workdir)
    if run_config is None:  # trained from Python: the typed config
      run_config = json.loads(json.dumps(run.to_dict(), default=str))
    card.write(
      out,
      policy.cfg,
      run_config=run_config,
      summaries={
        **(earlier or {}),
        **{k: v.summary for k, v in evals.items()},
      },
      step=run.steps,
    )
    logging.info("exported %s", out)
  if run.export.report:
    report.write(workdir, evals, run.eval.num_generations)
