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
import gc
import glob
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import tqdm
from absl import logging
from flax import nnx

from multians_jax import checkpoint, evaluate, export, sharding, telemetry
from multians_jax import policy as policy_lib
from multians_jax import warmup as warmup_lib
from multians_jax.data import pipeline as data
from multians_jax.rl import rollouts
from multians_jax.rl import update as update_lib

if TYPE_CHECKING:  # annotations only: the config tree and its settings
  from multians_jax.config import RunConfig
  from multians_jax.settings import SamplingConfig

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
  sampling: SamplingConfig  # run.sampling_for: the model's stop / pad ids
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
    # Only the parameters go on: the optimizer's moments are made anew after
    # the warm-up (zeros, as at step 0), not held through it.
    if int(state.step) == 0:
      params, state = state.params, None
      state = _before_rl(s, params, warm_up=not resumed)
    # 3. RL steps; checkpoints and evaluations on schedule.
    state, last, stopped = _rl_steps(s, state)
    if stopped:
      logging.warning("stopped at step %d (checkpoint saved)", last["step"])
      return {"stopped_at": last["step"], **last}
    # 4. After RL: evaluation, HF export with its model card, the report;
    # the parameters alone go on (the optimizer's moments are freed).
    params, state = state.params, None
    _after_rl(s, params)
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
  policy, tok = policy_lib.load_policy(run.model, mesh, run.seed, tokenizer)
  tok = tokenizer or tok
  graphdef = nnx.graphdef(policy)
  tx = update_lib.optimizer(run.optim_config)
  state = update_lib.init_state(policy, tx)
  dc = run.data
  source = train_source or data.open_split(dc, workdir, dc.train_split)
  stream = data.PromptIterator(source, tok, run.pipeline(run.seed))
  ref_of = None
  if run.loss.kl_beta > 0:  # from the source, before resuming
    ref_of = policy_lib.reference(run, mesh, tok, state.params)
  ckpt = checkpoint.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    max_to_keep=run.ckpt.keep,
    compress=run.ckpt.compress,
  )
  policy_lib.check_same_adapters(ckpt.path, policy.cfg)
  state, meta = checkpoint.restore_train_state(
    ckpt, state, mesh, sharding.TRAIN_RULES
  )
  resumed = meta is not None
  if resumed:
    stream.set_state(meta["data_state"])
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


def _before_rl(s: Session, params, *, warm_up: bool):
  """Step 0: the "before" evaluation, then (unless resumed from a step-0
  checkpoint, which is already warmed up) the warm-up and its evaluation;
  returns the RL train state (fresh optimizer state) of the result."""
  run = s.run
  gc.collect()  # the set-up's train state: its moments are cyclic garbage
  if run.eval.before_after:
    _evaluate(s, params, "before", 0)
  warm_up = bool(run.warmup.steps and warm_up)
  if warm_up:
    params = warmup_lib.run(
      run, s.graphdef, params, s.source, s.tok, s.mesh,
      log=lambda m: s.writer.write(0, m), progress=s.writer.active,
    )  # fmt: skip
    gc.collect()  # the warm-up's optimizer state
    if run.eval.before_after:
      _evaluate(s, params, "warmup", 0)
  state = update_lib.init_state(nnx.merge(s.graphdef, params), s.tx)
  if warm_up and run.steps == 0:  # the warmed-up model is the result
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
  last, unparsed = {}, 0
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
      unparsed = unparsed + 1 if last["format_valid_rate"] == 0 else 0
      if unparsed == run.rl.max_unparsed_steps:
        raise RuntimeError(
          f"no well-formed completion in {unparsed} steps in a row (to step "
          f"{step + 1}): every reward is the format penalty, so no advantage "
          "is left to learn from. Resume from a checkpoint saved before it "
          "(checkpoints/) with a lower optim.lr, or raise "
          "rl.max_unparsed_steps (0: never stop)"
        )
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


def _after_rl(s: Session, params) -> None:
  """The "after" evaluation, the HF export and model card, the report and
  its plots (also to the W&B run, if there is one)."""
  run = s.run
  gc.collect()  # the train state's moments, held by cycles
  if run.eval.before_after:
    if run.steps == 0 and "warmup" in s.evals:
      _keep_eval(s, "after", 0, s.evals["warmup"])  # the same model
    else:
      _evaluate(s, params, "after", run.steps)
  export.finish(run, s.workdir, s.graphdef, params, s.tok, s.evals)
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
  # Arrays held only by cycles (the merged module's graph) wait for the
  # cyclic collector, which may not run for many steps: free them now.
  gc.collect()
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
      pass_k=s.run.rl.pass_k if s.run.rl.advantage == "passk" else None,
    )


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
  adv, ainfo = rollouts.advantages(
    run, scored, len(batch.gold), live, step=int(state.step)
  )
  t1 = t0 + scored.seconds[0]  # sampling, every round
  t2 = time.perf_counter()
  state, um = update_lib.rl_update(
    s.graphdef, state, scored.rollout, adv, tx=s.tx, cfg=run.update_config,
    mesh=s.mesh, num_iterations=run.rl.num_iterations, ref_of=s.ref_of,
  )  # fmt: skip
  t3 = time.perf_counter()
  out = rollouts.step_metrics(first, g)
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
    lr=float(update_lib.schedule(run.optim_config)(int(state.step) - 1)),
  )
  return state, out


def _save(s: Session, step: int, state) -> None:
  checkpoint.save_train_state(
    s.ckpt, step, s.graphdef, state, tokenizer=s.tok,
    meta={"data_state": s.stream.get_state(), "seed": s.run.seed},
  )  # fmt: skip
