"""The run config: one tree, one set of defaults, every key checked."""

import dataclasses
import importlib
import os
import subprocess
import sys

import pytest

from configs import base
from multians_jax import config
from multians_jax.rl import reward


def test_base_config_is_the_default_tree():
  run = config.RunConfig.from_dict(base.get_config().to_dict())
  assert run == config.RunConfig()
  # key for key: the ConfigDict mirrors the dataclasses (no extra, none
  # missing), so the defaults live in one place
  assert run.to_dict() == _plain(base.get_config().to_dict())


def _plain(d):
  if isinstance(d, dict):
    return {k: _plain(v) for k, v in d.items()}
  return tuple(d) if isinstance(d, list) else d


def test_round_trip_and_every_shipped_config_loads():
  names = ["demo", "lab", "tiny", "study_countries", "qwen3_1_7b_gpu"]
  names += [
    f"qwen3_8b_{m}" for m in ("multi_rlcr", "multi_rlvr", "rlcr", "rlvr")
  ]
  for name in names:
    mod = importlib.import_module(f"configs.{name}")
    arg = "multi_rlcr" if name == "lab" else None
    run = config.RunConfig.from_dict(mod.get_config(arg).to_dict())
    assert config.RunConfig.from_dict(run.to_dict()) == run, name


@pytest.mark.parametrize("section", sorted(config.SECTIONS))
def test_an_unknown_key_in_any_section_is_named(section):
  c = base.get_config().to_dict()
  c[section]["no_such_key"] = 1
  with pytest.raises(ValueError, match=rf"{section}\.no_such_key"):
    config.RunConfig.from_dict(c)


def test_unknown_top_level_key_and_bad_types_are_named():
  c = base.get_config().to_dict()
  c["sampler_typo"] = {}
  with pytest.raises(ValueError, match="sampler_typo"):
    config.RunConfig.from_dict(c)
  for section, key, bad, why in (
    ("rl", "share_prompt", 1, "True or False"),
    ("rl", "num_generations", 2.5, "integer"),
    ("optim", "lr", "1e-5", "finite number"),
    ("optim", "lr", float("nan"), "finite number"),
    ("sampler", "top_k", True, "integer"),
    ("reward", "mode", 3, "string"),
    ("reward", "mode", "multi", "mode"),
    ("log", "wandb_mode", "sometimes", "wandb_mode"),
    ("rl", "advantage", "ppo", "rl.advantage"),
  ):
    c = base.get_config().to_dict()
    c[section][key] = bad
    with pytest.raises(ValueError, match=why):
      config.RunConfig.from_dict(c)


def test_cross_section_checks():
  c = base.get_config().to_dict()
  c["rl"]["credit"] = "answer"  # needs an additive correctness
  with pytest.raises(ValueError, match="additive correctness"):
    config.RunConfig.from_dict(c)
  c["reward"]["correctness"] = "count"
  assert config.RunConfig.from_dict(c).rl.credit == "answer"
  c["rl"]["micro_batches"] = 5  # 24 · 32 is not a multiple of 5
  with pytest.raises(ValueError, match="micro_batches must divide"):
    config.RunConfig.from_dict(c)


def test_derived_settings_come_from_one_place():
  run = config.RunConfig(
    steps=200,
    sampler=config.SamplerSection(max_new_tokens=300, temperature=0.9),
    optim=config.OptimSection(warmup_frac=0.1),
  )
  assert run.loss_config.max_len_norm == 300  # Dr.GRPO's constant = the limit L
  assert run.sampling.max_new_tokens == 300
  assert run.sampling.temperature == 0.9
  assert run.eval_config.sampling.max_new_tokens == 300  # samples alike
  assert run.eval_config.min_bucket == run.data.min_bucket == 64
  assert run.optim_config.warmup_steps == 20
  assert run.optim_config.total_steps == 200
  assert run.eval_seed == run.seed + 1


def test_evaluation_and_training_share_the_reward_defaults():
  """The bug this tree removed: evaluation's reward defaults differed."""
  assert config.RunConfig().reward == reward.RewardConfig()
  paper = reward.RewardConfig(**reward.PAPER)
  assert (paper.correctness, paper.preset) == ("count", "paper")
  assert paper.confidence_sum_le_one
  fields = {f.name for f in dataclasses.fields(reward.RewardConfig)}
  assert set(base.get_config().reward) == fields


@pytest.mark.slow
def test_a_config_error_ends_main_and_tools_with_one_line(tmp_path):
  """A bad config value ends the entry point and the tools with the
  message that names the key and a non-zero status, not a traceback."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  bad = ["--config=configs/tiny.py", "--config.rl.micro_batches=5"]
  for cmd in (
    ["-m", "multians_jax.main", *bad, f"--workdir={tmp_path}"],
    ["tools/memory.py", *bad, "--num_devices=1"],
  ):
    res = subprocess.run(
      [sys.executable, *cmd], cwd=root, capture_output=True, text=True,
      timeout=300,
    )  # fmt: skip
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "micro_batches must divide" in res.stderr.strip().splitlines()[-1]
