"""The training loop: learning, exact resume after SIGKILL, corrupt
checkpoints, SIGTERM, export of a trained checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import toy_task

from multians_jax import loop, sharding
from multians_jax import warmup as warmup_lib
from multians_jax.config import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_toy(workdir, c):
  """Trains config ``c`` on the toy task; returns its training rows."""
  loop.train(
    RunConfig.from_dict(c.to_dict()),
    str(workdir),
    train_source=toy_task.records(8),
    eval_source=toy_task.records(4),
    tokenizer=toy_task.tokenizer(),
  )
  return toy_task.training_rows(str(workdir))


# Learning tests on the toy task (METHOD §11): 32 steps. Rises (mean reward
# of the last 4 steps − the first 4) measured with tests/measure_margins.py
# toy over seeds 0-5 and 43 (2026-12-06, AMD EPYC): most seeds take off
# between steps 13 and 20 and saturate near the maximum of 2 by step 32, a
# slow one does not (full fine-tuning: 1.80-1.92 on six seeds, 0.47 on seed
# 43; mean 1.67, sd 0.53). Which trajectory a run takes depends on float
# rounding, so on the CPU's instruction set, as much as on the seed. At 16
# steps the rise was 0.54 ± 0.17, too close to the old 0.15 threshold.
TOY_STEPS = 32
# Full fine-tuning asserts on the mean of 3 seeds: its sd is 0.53 / √3 =
# 0.31, and 0.7 is 3.1 of those below the mean.
TOY_SEEDS = (0, 1, 2)
TOY_THRESHOLD = 0.7


def _toy_run(workdir, steps, seed=None, lr=None, **rl):
  c = toy_task.config(steps)
  c.rl.update(rl)
  if lr is not None:
    c.optim.lr = lr
  if seed is not None:
    c.seed = seed
  c.ckpt.every_steps = 2
  return _train_toy(workdir, c)


def _rise(rewards):
  return np.mean(rewards[-4:]) - np.mean(rewards[:4])


@pytest.mark.slow
def test_toy_task_reward_increases(tmp_path):
  """Full fine-tuning on the toy task: the mean reward rise over TOY_SEEDS
  clears TOY_THRESHOLD, and the update scores the sampled tokens as the
  sampler did."""
  rises = []
  for seed in TOY_SEEDS:
    c = toy_task.config(TOY_STEPS)
    c.seed = seed
    rows = _train_toy(tmp_path / f"s{seed}", c)
    rewards = [r["reward/total"] for r in rows]
    assert len(rewards) == TOY_STEPS
    rises.append(_rise(rewards))
    assert all(r["sampler/logp_diff_max"] < 1e-4 for r in rows)
    assert all(abs(r["sampler/ratio_mean"] - 1) < 1e-4 for r in rows)
  assert np.mean(rises) > TOY_THRESHOLD, rises


@pytest.mark.slow
def test_warm_up_runs_under_the_mesh_sharding_rules(tmp_path, monkeypatch):
  """The format warm-up traces its step as the RL update does: with the
  mesh's activation rules active, on a batch sharded over the batch axes
  (without them every activation constraint is silently off)."""
  seen = []
  real = warmup_lib.sft_step

  def spy(graphdef, params, opt_state, tokens, *rest, **kw):
    seen.append((sharding.active(), tokens.sharding.spec))
    return real(graphdef, params, opt_state, tokens, *rest, **kw)

  monkeypatch.setattr(warmup_lib, "sft_step", spy)
  c = toy_task.config(0)
  c.warmup.steps = 2
  _train_toy(tmp_path, c)
  assert len(seen) == 2
  for active, spec in seen:
    assert active is not None and active[1] is sharding.TRAIN_RULES
    assert active[0].shape["fsdp"] == 8 and spec[0] is not None


@pytest.mark.slow
def test_several_iterations_log_the_sampler_gap(tmp_path):
  """rl.num_iterations=2 on top_p=0.9 samples: π_old is recomputed by the
  trainer on the sampler's support, and the logged sampler/trainer gap is
  that of the recomputation (≈ 0), not of the later iterations."""
  c = toy_task.config(3)
  c.rl.num_iterations = 2
  c.sampler.top_p = 0.9
  c.ckpt.every_steps = 100
  rows = _train_toy(tmp_path, c)
  assert len(rows) == 3
  for r in rows:
    assert r["sampler/logp_diff_max"] < 1e-4
    assert abs(r["sampler/ratio_mean"] - 1) < 1e-4


@pytest.mark.slow
def test_answer_credit_learns_and_resumes_exactly(tmp_path):
  """rl.credit='answer' on the toy task: the reward rises, slot tokens take
  slot advantages, and a run resumed 4 steps before its end ends where an
  uninterrupted one does."""
  # Rise over seeds 0-5 and 43: 1.62, 1.88, 1.45, 1.73, 1.70, 1.82, 1.05
  # (mean 1.61, sd 0.29); the threshold 0.15 is 3.1 sd below the slowest
  # seed. Largest slot-token fraction: 0.80-1.0, threshold 0.15.
  rows = _toy_run(tmp_path / "a", TOY_STEPS, credit="answer", seed=0)
  rewards = [r["reward/total"] for r in rows]
  assert _rise(rewards) > 0.15, rewards
  assert max(r["credit/slot_token_frac"] for r in rows) > 0.15
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  last = TOY_STEPS
  for step in (str(last - 2), str(last)):
    shutil.rmtree(tmp_path / "b" / "checkpoints" / step)
  # redoes the last 4 steps
  _toy_run(tmp_path / "b", TOY_STEPS, credit="answer", seed=0)
  (sa, a), (sb, b) = (
    toy_task.params(tmp_path / "a"),
    toy_task.params(tmp_path / "b"),
  )
  assert sa["step"] == sb["step"] == TOY_STEPS
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_dynamic_sampling_refills_and_resumes_exactly(tmp_path):
  """rl.dynamic_sampling on the toy task (many all-fail groups at first):
  extra rounds are drawn, the stream advances past them, and a run resumed
  from step 4 ends where an uninterrupted one does. The update runs in
  token-budget micro-batches (two groups of T + G·W = 64 + 16·2 each)."""
  kw = dict(micro_batches=1, micro_batch_tokens=192)
  rows = _toy_run(
    tmp_path / "a", 6, dynamic_sampling=True, dynamic_max_rounds=2, **kw
  )
  assert {r["update/micro_batches"] for r in rows} == {2}
  assert max(r["dynamic/rounds"] for r in rows) >= 1
  assert 0 < np.mean([r["dynamic/filtered_frac"] for r in rows]) < 1
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")
  rows_b = _toy_run(
    tmp_path / "b", 6, dynamic_sampling=True, dynamic_max_rounds=2, **kw
  )
  assert rows_b[-2:] == rows[-2:]  # steps 5-6 redone: same metrics
  (sa, a), (sb, b) = (
    toy_task.params(tmp_path / "a"),
    toy_task.params(tmp_path / "b"),
  )
  assert sa["data_state"] == sb["data_state"]
  extra = sum(r["dynamic/rounds"] for r in rows)
  assert sa["data_state"]["num_batches"] == 6 + extra  # one per round
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_decoupled_credit_packed_update_resumes_exactly(tmp_path):
  """rl.credit='decoupled' with packed completions in token-budget
  micro-batches: per-token advantages reach the update, and a run resumed
  from step 4 ends bitwise where the uninterrupted one does."""
  kw = dict(credit="decoupled", pack_completions=True, micro_batches=1)
  kw.update(micro_batch_tokens=96)
  rows = _toy_run(tmp_path / "a", 6, seed=0, **kw)
  assert max(r["credit/slot_token_frac"] for r in rows) > 0
  # One row per group: the 4 groups and 4 empty rows fill the batch axis'
  # 8 devices in one micro-batch, whatever the budget.
  assert {r["update/micro_batches"] for r in rows} == {1}
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")
  rows_b = _toy_run(tmp_path / "b", 6, seed=0, **kw)
  assert rows_b[-2:] == rows[-2:]  # steps 5-6 redone: same metrics
  (_, a), (_, b) = (
    toy_task.params(tmp_path / "a"),
    toy_task.params(tmp_path / "b"),
  )
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_uncompressed_checkpoints_resume_exactly(tmp_path):
  """ckpt.compress=False: a run resumed from an uncompressed step, and one
  begun compressed and resumed uncompressed, end bitwise where the
  uninterrupted run does (a restore reads what its step was written
  with)."""

  def run(workdir, steps, compress):
    c = toy_task.config(steps)
    c.seed = 0
    c.ckpt.every_steps = 2
    c.ckpt.compress = compress
    return _train_toy(workdir, c)

  rows = run(tmp_path / "a", 4, compress=False)
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")
  assert run(tmp_path / "b", 4, compress=False)[-2:] == rows[-2:]
  run(tmp_path / "c", 2, compress=True)
  run(tmp_path / "c", 4, compress=False)
  _, a = toy_task.params(tmp_path / "a")
  for other in ("b", "c"):
    meta, b = toy_task.params(tmp_path / other)
    assert meta["step"] == 4
    for x, y in zip(a, b, strict=True):
      np.testing.assert_array_equal(x, y)


def test_a_run_without_parsed_completions_stops_with_a_message(tmp_path):
  """rl.max_unparsed_steps: steps in a row in which no completion parses
  (one new token cannot hold K=2 answers) end the run with a message that
  names the cause, instead of going on without a reward signal."""
  c = toy_task.config(8)
  c.sampler.max_new_tokens = 1
  c.rl.max_unparsed_steps = 3
  with pytest.raises(RuntimeError, match="no well-formed completion in 3 "):
    _train_toy(tmp_path, c)
  rows = toy_task.training_rows(str(tmp_path))
  assert [r["format_valid_rate"] for r in rows] == [0.0] * 3


@pytest.mark.parametrize("compress", [True, False])
def test_checkpoint_compression_switch(tmp_path, compress):
  """Checkpointer(compress=...): zeros take next to nothing on disk when
  compressed and their full bytes when not, and restore the same."""
  import jax
  import jax.numpy as jnp

  from multians_jax import checkpoint
  from multians_jax.model import transformer as model_lib

  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  cfg = model_lib.ModelConfig("llama", 64, 32, 2, 4, 2, 8, 48)
  model = model_lib.init_model(cfg, mesh, sharding.TRAIN_RULES, 1)
  zeros = {"z": jnp.zeros((512, 1024), jnp.float32)}  # 2 MiB
  path = tmp_path / "checkpoints"
  ck = checkpoint.Checkpointer(path, async_save=False, compress=compress)
  ck.save(1, model, items={"zeros": zeros})
  ck.close()
  on_disk = sum(f.stat().st_size for f in (path / "1" / "zeros").rglob("*"))
  assert (on_disk < 2**18) == compress, on_disk
  _, _, items = toy_task.restore(tmp_path, items={"zeros": zeros})
  np.testing.assert_array_equal(items["zeros"]["z"], zeros["z"])


def _cmd(workdir, steps, *extra):
  return [
    sys.executable,
    "-m",
    "multians_jax.main",
    "--config=configs/tiny.py",
    f"--workdir={workdir}",
    f"--config.steps={steps}",
    f"--config.data.data_dir={workdir}/../data",
    *extra,
  ]


def _run(workdir, steps, *extra):
  subprocess.run(
    _cmd(workdir, steps, *extra),
    cwd=ROOT,
    check=True,
    capture_output=True,
    timeout=600,
  )


def _wait_for(path, proc, timeout=300):
  t0 = time.time()
  while not os.path.exists(path):
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    assert time.time() - t0 < timeout
    time.sleep(0.05)


def _params(workdir):
  meta, leaves = toy_task.params(workdir)
  return meta["step"], leaves


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """6 steps in one go (checkpoints at 2, 4, 6)."""
  work = str(tmp_path_factory.mktemp("runs") / "straight")
  _run(work, 6)
  return work


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(straight):
  work = os.path.join(os.path.dirname(straight), "killed")
  proc = subprocess.Popen(
    _cmd(work, 6), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  _wait_for(os.path.join(work, "checkpoints", "2"), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  _run(work, 6)  # the same command again: resumes from its checkpoint
  step_a, a = _params(straight)
  step_b, b = _params(work)
  assert step_a == step_b == 6
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  assert toy_task.training_rows(straight) == toy_task.training_rows(work)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(straight):
  work = os.path.join(os.path.dirname(straight), "corrupt")
  shutil.copytree(straight, work)
  params_dir = os.path.join(work, "checkpoints", "6", "params")
  n = 0
  for root, _, files in os.walk(params_dir):
    for f in files:
      with open(os.path.join(root, f), "r+b") as fh:
        fh.truncate(max(0, os.path.getsize(fh.name) // 3))
        n += 1
  assert n
  out = subprocess.run(
    _cmd(work, 6), cwd=ROOT, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "checkpoint step 6 unreadable" in out.stderr
  step_a, a = _params(straight)
  step_b, b = _params(work)  # steps 5-6 redone from step 4: same result
  assert step_a == step_b == 6
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  assert toy_task.training_rows(straight) == toy_task.training_rows(work)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
  work = str(tmp_path / "term")
  proc = subprocess.Popen(
    _cmd(work, 200), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  _wait_for(os.path.join(work, "checkpoints", "2"), proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  steps = sorted(
    int(s) for s in os.listdir(os.path.join(work, "checkpoints")) if s.isdigit()
  )
  rows = toy_task.training_rows(work)
  assert steps[-1] == rows[-1]["step"] >= 2
  assert steps[-1] < 200


@pytest.mark.slow
def test_orbax_to_hf_on_a_training_checkpoint(straight, tmp_path):
  out = tmp_path / "hf"
  subprocess.run(
    [
      sys.executable,
      "tools/orbax_to_hf.py",
      f"--ckpt={straight}/checkpoints",
      f"--out={out}",
    ],
    cwd=ROOT,
    check=True,
    capture_output=True,
    timeout=300,
  )
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["num_hidden_layers"] == 2 and cfg["vocab_size"] == 49152
  assert (out / "tokenizer.json").exists()


@pytest.mark.slow
def test_evaluate_tool_on_a_training_checkpoint(straight, tmp_path):
  out = tmp_path / "eval"
  subprocess.run(
    [
      sys.executable,
      "tools/evaluate.py",
      f"--model={straight}/checkpoints",
      "--config.data.name=countries",
      f"--config.data.data_dir={straight}/../data",
      "--config.eval.num_prompts=4",
      "--config.eval.num_generations=2",
      "--config.sampler.max_new_tokens=8",
      "--baseline_samples=3",
      f"--out={out}",
    ],
    cwd=ROOT,
    check=True,
    capture_output=True,
    timeout=600,
  )
  res = json.loads((out / "metrics.json").read_text())
  m, b = res["metrics"], res["baseline"]["metrics"]
  assert m["num_prompts"] == 4 and "coverage@6" in m
  assert b["num_prompts"] == 4 and "coverage@3" in b
  assert (out / "coverage_vs_k.png").exists()


@pytest.mark.slow
def test_sample_tool_with_the_run_config(straight):
  """tools/sample.py --config prompts and samples as the run does: the
  config's system prompt (mode, K, family) and sampler settings."""
  from configs import tiny
  from multians_jax import sources
  from multians_jax.data import prompts

  cmd = [
    sys.executable, "tools/sample.py", f"--model={straight}",
    "--config=configs/tiny.py", "--prompt=Name a country.",
    "--num_samples=3", "--json",
  ]  # fmt: skip
  out = subprocess.run(
    cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
  )
  rows = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
  c = tiny.get_config()
  tok = sources.load_tokenizer(straight)
  msgs = prompts.build_messages(
    "Name a country.", c.reward.mode, c.data.family, c.reward.num_answers
  )
  want = tok.apply_chat_template(
    msgs, add_generation_prompt=True, tokenize=False
  )
  assert len(rows) == 3 and all(r["prompt"] == want for r in rows)
  assert all(len(r["token_ids"]) <= c.sampler.max_new_tokens for r in rows)
  assert all("format_ok" in r for r in rows)
  bad = subprocess.run(
    [*cmd, "--config.sampler.top_p=1.5"], cwd=ROOT, capture_output=True,
    text=True, timeout=300,
  )  # fmt: skip
  assert bad.returncode != 0 and "sample: config: " in bad.stderr
  assert "sampler.top_p must be in (0, 1]" in bad.stderr


def test_a_workdir_is_a_checkpoint_path(tmp_path):
  """Every tool's --ckpt / --model goes through sources.resolve: a
  training WORKDIR names its checkpoints/ directory (latest step)."""
  from multians_jax import checkpoint, sources
  from multians_jax.model import transformer as model_lib

  ck = tmp_path / "run" / "checkpoints"
  checkpoint.write_model_config(
    str(ck), model_lib.ModelConfig("llama", 64, 32, 2, 4, 2, 8, 48)
  )
  assert sources.resolve(str(tmp_path / "run")) == ("checkpoint", str(ck))
  assert sources.resolve(str(ck)) == ("checkpoint", str(ck))
  with pytest.raises(FileNotFoundError, match="not a checkpoint dir"):
    sources.resolve(str(tmp_path / "missing"))


def test_evaluation_samples_with_the_runs_sampler_settings(
  tmp_path, monkeypatch
):
  """In-training evaluation samples as training does: the run's top-p,
  top-k, cache dtype and slots, and the model's stop/pad ids, at
  ``eval.temperature`` (it once sampled with every sampler default)."""
  from multians_jax.model import sampler

  seen = []
  real = sampler.sample

  def spy(model, tokens, mask, key, cfg, *a, **kw):
    seen.append(cfg)
    return real(model, tokens, mask, key, cfg, *a, **kw)

  monkeypatch.setattr(sampler, "sample", spy)
  c = toy_task.config(1)
  c.sampler.update(top_p=0.9, top_k=7, cache_dtype="bfloat16", slots=8)
  c.eval.update(before_after=True, num_prompts=4, temperature=0.5)
  _train_toy(tmp_path, c)
  train = [s for s in seen if s.temperature == c.sampler.temperature]
  evals = [s for s in seen if s.temperature == 0.5]
  assert train and len(evals) >= 2  # before and after
  for s in train + evals:
    assert (s.top_p, s.top_k, s.cache_dtype, s.slots) == (
      0.9, 7, "bfloat16", 8
    )  # fmt: skip
    assert s.max_new_tokens == c.sampler.max_new_tokens
    assert s.stop_ids == train[0].stop_ids and s.stop_ids
    assert s.pad_id == train[0].pad_id
