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
from collections.abc import Callable
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
  evaluate,
  hf,
  lora,
  loss,
  metrics,
  report,
  rollouts,
  sampler,
  sharding,
  telemetry,
)
from multians_jax import model as model_lib
from multians_jax import update as update_lib
from multians_jax import warmup as warmup_lib
from multians_jax.config import ModelSource, RunConfig

# ---------------------------------------------------------------------------
# Set-up


def load_policy(src: ModelSource, mesh, seed: int, tokenizer=None):
  """(model, tokenizer) from the configured source, in training sharding.

  With ``model.lora_rank`` > 0 the policy is the source + fresh adapters
  (a source that already holds different adapters has them merged first);
  a source with the same adapter shape (a LoRA run's checkpoint) is used
  as it is.
  """
  over = src.overrides
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


@dataclasses.dataclass
class Session:
  """What every part of one training run shares, built once by ``_setup``.

  ``state`` is not here: each part takes the train state and returns the
  new one, so no closure holds a stale copy.
  """

  run: RunConfig
  workdir: str
  mesh: Any
  graphdef: Any  # the policy's nnx.GraphDef
  tx: Any  # the optax optimizer
  tok: Any
  source: Any  # the training records
  stream: data.PromptIterator  # the training prompt stream
  sampling: sampler.SamplingConfig
  ckpt: checkpoint.Checkpointer
  writer: telemetry.Writer
  ref_of: Callable | None = None  # params → reference params (KL)
  eval_records: list | None = None
  evals: dict = dataclasses.field(default_factory=dict)  # tag → EvalResult


def train(
  run: RunConfig,
  workdir: str,
  *,
  train_source=None,
  eval_source=None,
  tokenizer=None,
) -> dict:
  """Trains; returns the final metrics (and eval summaries).

  ``train_source`` / ``eval_source`` (record sequences) and ``tokenizer``
  replace the configured dataset and the model's tokenizer.
  """
  # 1. Set-up: mesh, policy, data, logging; resume from the newest step.
  s, state, resumed = _setup(run, workdir, train_source, eval_source, tokenizer)
  try:
    # 2. Before RL, on a fresh run: evaluation, then the format warm-up.
    if int(state.step) == 0:
      state = _before_rl(s, state, warm_up=not resumed)
    # 3. RL steps; checkpoints and evaluations on schedule.
    state, last, stopped = _rl_steps(s, state)
    if stopped:
      logging.warning("stopped at step %d (checkpoint saved)", last["step"])
      return {"stopped_at": last["step"], **last}
    # 4. After RL: evaluation, HF export with its model card, the report.
    _after_rl(s, state)
  finally:
    s.writer.close()  # the W&B run ends too
  s.ckpt.close()
  return {"final": last, **{k: v.summary for k, v in s.evals.items()}}


def _setup(run, workdir, train_source, eval_source, tokenizer):
  """(Session, train state, resumed?) for ``train``."""
  os.makedirs(workdir, exist_ok=True)
  if run.data.prompts_per_step % jax.process_count():
    raise ValueError(
      f"config: data.prompts_per_step={run.data.prompts_per_step} must be a "
      f"multiple of the process count {jax.process_count()}"
    )
  mesh = sharding.make_mesh(*run.mesh.shape)
  policy, tok = load_policy(run.model, mesh, run.seed, tokenizer)
  tok = tokenizer or tok
  graphdef = nnx.graphdef(policy)
  tx = update_lib.optimizer(run.optim_config)
  state = update_lib.init_state(policy, tx)
  dc = run.data
  source = train_source or data.open_split(dc, workdir, dc.train_split)
  stream = data.PromptIterator(source, tok, _pipeline(run, run.seed))
  ref_of = None
  if run.loss.kl_beta > 0:  # from the source, before resuming
    ref_of = _reference(run, mesh, tok, state.params)
  ckpt = checkpoint.Checkpointer(
    os.path.join(workdir, "checkpoints"), max_to_keep=run.ckpt.keep
  )
  _check_same_adapters(ckpt.path, policy.cfg)
  state, resumed = _resume(ckpt, state, mesh, stream)
  if jax.process_index() == 0:  # rows after the checkpoint are redone
    telemetry.truncate_after(
      os.path.join(workdir, "metrics.jsonl"), int(state.step)
    )
  writer = telemetry.Writer(
    workdir,
    run.log.tensorboard,
    wandb_project=run.log.wandb_project,
    wandb_entity=run.log.wandb_entity,
    wandb_mode=run.log.wandb_mode,
    config=run.to_dict(),  # the W&B run config
  )
  scfg = run.sampling_for(policy.cfg, tok)
  eval_records = None
  if run.eval.before_after or run.eval.every_steps:
    records = eval_source or data.open_split(dc, workdir, dc.eval_split)
    eval_records = list(_take(records, run.eval.num_prompts))
  session = Session(
    run, workdir, mesh, graphdef, tx, tok, source, stream, scfg, ckpt,
    writer, ref_of, eval_records,
  )  # fmt: skip
  return session, state, resumed


def _pipeline(run: RunConfig, seed: int, batch_size: int | None = None):
  """The prompt pipeline's settings: global batches, the same stream on
  every process."""
  return data.PipelineConfig(
    batch_size=batch_size or run.data.prompts_per_step,
    mode=run.reward.mode,
    num_answers=run.reward.num_answers,
    max_prompt_len=run.data.max_prompt_len,
    min_bucket=run.data.min_bucket,
    seed=seed,
  )


def _before_rl(s: Session, state, *, warm_up: bool):
  """Step 0: the "before" evaluation, then (unless resumed from a step-0
  checkpoint, which is already warmed up) the warm-up and its evaluation."""
  run = s.run
  if run.eval.before_after:
    _evaluate(s, state.params, "before", 0)
  if run.warmup.steps and warm_up:
    params = _warmup(s, state.params)
    state = update_lib.init_state(nnx.merge(s.graphdef, params), s.tx)
    if run.eval.before_after:
      _evaluate(s, state.params, "warmup", 0)
    if run.steps == 0:  # the warmed-up model is the result
      _save(s, 0, state)
  return state


def _rl_steps(s: Session, state):
  """RL steps from ``state.step`` to ``run.steps``; returns (state, last
  metrics, stopped by a signal?). Each step is logged, saved every
  ``ckpt.every_steps`` and at the end or on a signal, evaluated every
  ``eval.every_steps``."""
  run, start = s.run, int(state.step)
  stop = _Stop()
  key = jax.random.key(run.seed)
  bar = tqdm.tqdm(
    total=run.steps,
    initial=start,
    disable=not s.writer.active,
    dynamic_ncols=True,
    desc="train",
  )
  last = {}
  try:
    for step in range(start, run.steps):
      state, last = _rl_step(
        s, state, next(s.stream), jax.random.fold_in(key, step)
      )
      if int(state.skipped) >= run.rl.max_nonfinite:
        raise FloatingPointError(
          f"{int(state.skipped)} non-finite updates in a row at step {step}:"
          " lower optim.lr, check the data, or raise rl.max_nonfinite"
        )
      last.update(data_dropped=s.stream.num_dropped, step=step + 1)
      if (step + 1) % run.log.every_steps == 0:
        s.writer.write(step + 1, last)
      bar.update(1)
      bar.set_postfix(
        reward=f"{last['reward/total']:.3f}",
        fmt=f"{last['format_valid_rate']:.2f}",
        loss=f"{last['loss']:.4f}",
      )
      final = step + 1 == run.steps
      if stop.requested or final or (step + 1) % run.ckpt.every_steps == 0:
        _save(s, step + 1, state)
      every = run.eval.every_steps
      if every and (step + 1) % every == 0 and not final:
        _evaluate(s, state.params, f"step{step + 1}", step + 1)
      if stop.requested:
        break
  finally:
    stop.restore()
    bar.close()
    s.ckpt.wait()
  return state, last, stop.requested


def _after_rl(s: Session, state) -> None:
  """The "after" evaluation, the HF export and model card, the report and
  its plots (also to the W&B run, if there is one)."""
  run = s.run
  if run.eval.before_after:
    if run.steps == 0 and "warmup" in s.evals:
      _keep_eval(s, "after", 0, s.evals["warmup"])  # the same model
    else:
      _evaluate(s, state.params, "after", run.steps)
  _finish(s, state)
  if run.export.report:
    for d in [s.workdir, *sorted(glob.glob(os.path.join(s.workdir, "eval_*")))]:
      sub = "" if d == s.workdir else os.path.basename(d) + "/"
      pngs = sorted(glob.glob(os.path.join(d, "*.png")))
      s.writer.log_files(pngs, step=run.steps, prefix=f"report/{sub}")


def _evaluate(s: Session, params, tag: str, step: int):
  """Evaluates ``params`` on the held-out records, logs ``eval/*`` rows
  and keeps the result under ``tag``."""
  res = evaluate.run(
    nnx.merge(s.graphdef, params),
    s.tok,
    s.eval_records,
    s.run.reward,
    s.run.eval_config,
    seed=s.run.eval_seed,
    mesh=s.mesh,
    stop_ids=s.sampling.stop_ids,
    pad_id=s.sampling.pad_id,
  )
  s.writer.write(step, res.summary, prefix="eval/")
  _keep_eval(s, tag, step, res)
  return res


def _keep_eval(s: Session, tag: str, step: int, res) -> None:
  s.evals[tag] = res
  if s.writer.active:  # process 0: WORKDIR/eval/<tag>.json (tools/compare.py)
    evaluate.write_json(
      os.path.join(s.workdir, "eval", f"{tag}.json"),
      res,
      tag=tag,
      step=step,
      mode=s.run.reward.mode,
      num_answers=s.run.reward.num_answers,
      seed=s.run.seed,
      num_generations=s.run.eval.num_generations,
    )


def _warmup(s: Session, params):
  """Supervised format warm-up on training questions (see warmup.py),
  under the mesh's sharding rules like the RL update."""
  run, wc = s.run, s.run.warmup
  pcfg = _pipeline(run, run.seed + 7, batch_size=wc.batch_prompts)
  it = data.PromptIterator(s.source, s.tok, pcfg)
  tx = warmup_lib.optimizer(wc)
  opt_state = jax.jit(tx.init)(lora.partition(params)[0])
  bar = tqdm.trange(wc.steps, desc="warm-up", disable=not s.writer.active)
  for i in bar:
    b = warmup_lib.make_batch(
      next(it),
      s.tok,
      run.reward.mode,
      run.reward.num_answers,
      wc.max_target_len,
      seed=run.seed + i,
      cfg=wc,
    )
    b = update_lib.place_batch(b, s.mesh)
    with sharding.activate(s.mesh, sharding.TRAIN_RULES):
      params, opt_state, value = warmup_lib.sft_step(
        s.graphdef, params, opt_state, *b, tx=tx, chunk=run.rl.logprob_chunk
      )
    s.writer.write(0, {"warmup/loss": value, "warmup/step": i + 1})
  return params


def _take(source, n):
  for i in range(min(n, len(source))):
    yield source[i]


def _rl_step(s: Session, state, batch, key):
  """One RL iteration on ``batch``; returns (state, metrics).

  With ``rl.dynamic_sampling`` further batches are drawn from the stream
  (``rollouts.dynamic_fill``). The reward and length metrics describe the
  first batch, what the policy does on the data stream, so they read the
  same with dynamic sampling on or off.
  """
  run, g = s.run, s.run.rl.num_generations
  t0 = time.perf_counter()
  model = nnx.merge(s.graphdef, state.params)
  sample = lambda b, k: rollouts.sample_and_score(
    run, model, b, s.tok, s.sampling, k, s.mesh
  )
  first = sample(batch, key)
  scored, live, dinfo = first, None, {}
  if run.rl.dynamic_sampling:
    more = lambda r: sample(
      next(s.stream), jax.random.fold_in(key, 1_000_003 * r)
    )
    scored, live, dinfo = rollouts.dynamic_fill(
      first, more, g, run.rl.dynamic_max_rounds
    )
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
  t1 = t0 + scored.seconds[0]  # sampling, every round
  t2 = time.perf_counter()
  state, um = _update(s, state, scored.rollout, adv)
  t3 = time.perf_counter()
  lengths = first.rewards.lengths
  out = metrics.summarize(first.rewards.scores, lengths, group_size=g)
  out.update({k: float(v) for k, v in um.items()})
  out.update(
    {
      k if "/" in k else f"adv/{k}": float(v)
      for k, v in {**ainfo, **dinfo}.items()
    }
  )
  out.update(
    time_sample=t1 - t0,
    time_reward=t2 - t1,
    time_update=t3 - t2,
    time_step=t3 - t0,
    tokens_per_sec=float(np.sum(lengths)) / max(first.seconds[0], 1e-9),
    truncation_rate=float(np.mean(first.rewards.truncated)),
    lr=float(update_lib.schedule(run.optim_config)(int(state.step) - 1)),
  )
  return state, out


def _update(s: Session, state, rollout, adv):
  """The policy update on one rollout (``rl.num_iterations`` steps under
  the mesh's sharding rules); returns (state, host metrics)."""
  run = s.run
  ub = update_lib.place_batch(update_lib.make_batch(rollout, adv), s.mesh)
  ucfg = update_lib.UpdateConfig(
    loss=run.loss,
    micro_batches=run.rl.micro_batches,
    temperature=max(run.sampler.temperature, 1e-6),
    logprob_chunk=run.rl.logprob_chunk,
    group_size=run.rl.num_generations if run.rl.share_prompt else 1,
    support=run.sampling.support,
  )
  logprobs = lambda params: update_lib.completion_logprobs(
    s.graphdef, params, ub, ucfg
  )
  gap = None
  with sharding.activate(s.mesh, sharding.TRAIN_RULES):
    if run.rl.num_iterations > 1:  # π_old = the policy that sampled, exactly
      trainer = logprobs(state.params)
      sums = loss.logp_gap(trainer, ub.old_logp, ub.comp_mask)
      gap = loss.reduce_metrics({**sums, "tokens": jnp.sum(ub.comp_mask)})
      ub = ub.replace(old_logp=trainer)
    if s.ref_of is not None:
      ub = ub.replace(ref_logp=logprobs(s.ref_of(state.params)))
    for _ in range(run.rl.num_iterations):
      state, um = update_lib.update_step(
        s.graphdef, state, ub, tx=s.tx, cfg=ucfg
      )
      gap = um if gap is None else gap  # first iteration: π_old = sampler's
  # The trainer's log-probs of the sampled tokens against the sampler's,
  # before any update: the importance ratio (1 on-policy) and |difference|.
  um = {
    **um,
    "sampler/ratio_mean": gap["token_ratio_mean"],
    "sampler/logp_diff_mean": gap["logp_diff_mean"],
    "sampler/logp_diff_max": gap["logp_diff_max"],
  }
  return state, jax.device_get(um)


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


def _save(s: Session, step: int, state) -> None:
  s.ckpt.save(
    step,
    nnx.merge(s.graphdef, state.params),
    tokenizer=s.tok,
    meta={"data_state": s.stream.get_state(), "seed": s.run.seed},
    items={
      "opt_state": state.opt_state,
      "train": {"step": state.step, "skipped": state.skipped},
    },
  )


def _resume(ckpt, state, mesh, stream) -> tuple[Any, bool]:
  """(state, resumed?): the newest restorable step and its data-stream
  position, or ``state`` itself when there is none."""
  abstract = lambda t: jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), t
  )
  items = {
    "opt_state": abstract(state.opt_state),
    "train": abstract({"step": state.step, "skipped": state.skipped}),
  }
  got = ckpt.restore_newest(mesh, sharding.TRAIN_RULES, items)
  if got is None:
    return state, False
  step, model, meta, items = got
  stream.set_state(meta["data_state"])
  t = items["train"]
  state = update_lib.TrainState(
    t["step"], nnx.state(model, nnx.Param), items["opt_state"], t["skipped"]
  )
  logging.info("resumed from step %d", step)
  return state, True


def _finish(s: Session, state) -> None:
  """Process 0 writes the HF export (+ model card) and the report; the
  export gathers the parameters collectively first."""
  run, workdir, evals = s.run, s.workdir, s.evals
  params = state.params
  if run.export.hf_dir and jax.process_count() > 1:  # collective: all processes
    params = jax.tree.map(sharding.host_array, params)
  if jax.process_index() != 0:
    return
  if run.export.hf_dir:
    out = os.path.join(workdir, run.export.hf_dir)
    policy = nnx.merge(s.graphdef, params)
    hf.save(policy, out, tokenizer=s.tok)
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
