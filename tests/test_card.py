"""Model cards of HF exports: front matter that huggingface_hub parses, the
method, the config and the evaluation table of the run."""

import json
import pathlib
import subprocess
import sys

import pytest
import toy_task
from huggingface_hub import ModelCard

from multians_jax import loop, sources
from multians_jax.config import RunConfig
from multians_jax.model import transformer as model_lib
from multians_jax.report import card

CFG = model_lib.ModelConfig("llama", 64, 32, 2, 4, 2, 8, 48)


def test_card_front_matter_method_and_table(tmp_path):
  run_config = {
    "model": {"path": "smollm2"},
    "reward": {"mode": "multi_rlcr", "num_answers": 3},
    "data": {"name": "countries"},
  }
  summaries = {
    "before": {"coverage@3": 0.25, "ece": 0.2},
    "after": {"coverage@3": 0.5, "ece": None},
  }
  card.write_card(
    str(tmp_path),
    CFG.replace(lora_rank=8),
    run_config=run_config,
    summaries=summaries,
    step=12,
  )
  c = ModelCard.load(tmp_path / "README.md")
  assert c.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
  assert c.data.license == "apache-2.0"
  assert {"multians_jax", "multi-rlcr", "lora"} <= set(c.data.tags)
  assert "K = 3 distinct candidate answers" in c.text
  assert "for 12 steps" in c.text and "rank-8 LoRA" in c.text
  assert "| coverage@3 | 0.250 | 0.500 | ↑ |" in c.text
  assert "| ECE (10 bins) | 0.200 | – | ↓ |" in c.text
  body = c.text.split("```json")[1].split("```")[0]
  assert json.loads(body) == run_config


def test_base_model_is_named_only_when_known():
  assert sources.base_model("Qwen/Qwen3-8B@main") == ("Qwen/Qwen3-8B", None)
  assert sources.base_model("/tmp/some/dir") == (None, None)
  assert sources.base_model("random") == (None, None)
  assert sources.base_model("gs://bucket/model") == (None, None)


@pytest.mark.slow
def test_run_export_and_tool_export_carry_the_card(tmp_path):
  c = toy_task.config(2)
  c.eval.before_after = True
  c.eval.num_prompts = 2
  c.export.hf_dir = "hf"
  work = tmp_path / "run"
  work.mkdir()
  (work / "config.json").write_text(json.dumps(c.to_dict()))  # as main.py
  loop.train(
    RunConfig.from_dict(c.to_dict()),
    str(work),
    train_source=toy_task.records(8),
    eval_source=toy_task.records(4),
    tokenizer=toy_task.tokenizer(),
  )
  from_run = ModelCard.load(work / "hf" / "README.md")
  assert "multi-rlvr" in from_run.data.tags
  assert "| metric | before | after RL | |" in from_run.text
  subprocess.run(
    [
      sys.executable,
      "tools/orbax_to_hf.py",
      f"--ckpt={work}",  # the WORKDIR: its latest step
      f"--out={tmp_path / 'tool'}",
    ],
    check=True,
    capture_output=True,
    cwd=str(pathlib.Path(__file__).parent.parent),
  )
  from_tool = ModelCard.load(tmp_path / "tool" / "README.md")
  assert from_tool.data.tags == from_run.data.tags
  assert "| metric | before | after RL | |" in from_tool.text
  assert "for 2 steps" in from_tool.text
