"""Model sources beyond local paths: a Hugging Face Hub id resolved from the
huggingface_hub cache (offline), through tools/sample.py and training."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import toy_task
from hf_models import tiny_hf

from multians_jax import checkpoint, loop, sharding

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(root, repo="acme/tiny-llama"):
  """A Hub cache laid out as huggingface_hub lays it out: refs/main → the
  commit, snapshots/<commit>/ with the files (here written in place)."""
  d = root / f"models--{repo.replace('/', '--')}"
  snap = d / "snapshots" / COMMIT
  ref = tiny_hf("llama", vocab=len(toy_task.VOCAB), tied=True)
  ref.save_pretrained(snap)
  toy_task.tokenizer().save_pretrained(snap)
  (snap / "pytorch_model.bin").write_bytes(b"not fetched")  # not in HUB_FILES
  (d / "refs").mkdir()
  (d / "refs" / "main").write_text(COMMIT)
  return ref, snap


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
  cache = tmp_path / "hub"
  cache.mkdir()
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return cache


def test_hub_id_resolves_from_the_cache_offline(offline_hub, one_device_mesh):
  ref, snap = _hub_cache(offline_hub)
  assert checkpoint.resolve("acme/tiny-llama") == ("hf", str(snap))
  at = checkpoint.resolve(f"acme/tiny-llama@{COMMIT}")
  assert at == ("hf", str(snap))
  m, cfg, tok = checkpoint.load_model(
    "acme/tiny-llama", one_device_mesh, sharding.TRAIN_RULES
  )
  assert cfg.vocab_size == len(toy_task.VOCAB) and tok is not None
  with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set"):
    checkpoint.resolve("acme/not-cached")
  with pytest.raises(FileNotFoundError, match="not a checkpoint dir"):
    checkpoint.resolve("no_such_dir")  # not an id: a missing local path


def test_sample_cli_takes_a_hub_id(offline_hub):
  _hub_cache(offline_hub)
  env = dict(os.environ)
  out = subprocess.run(
    [
      sys.executable,
      "tools/sample.py",
      "--model=acme/tiny-llama",
      "--prompt=colours?",
      "--max_new_tokens=3",
      "--json",
    ],
    cwd=ROOT,
    env=env,
    check=True,
    capture_output=True,
    text=True,
  )
  row = json.loads(out.stdout.strip().splitlines()[-1])
  assert row["prompt"] and len(row["token_ids"]) == 3 and "completion" in row


def test_training_from_a_hub_id(offline_hub, tmp_path):
  _hub_cache(offline_hub)
  c = toy_task.config(2)
  c.model.path = "acme/tiny-llama"
  c.model.arch = {}
  c.export.hf_dir = "hf"
  loop.train(
    loop.RunConfig.from_dict(c.to_dict()),
    str(tmp_path / "run"),
    train_source=toy_task.records(8),
    eval_source=toy_task.records(4),
  )
  rows = [
    json.loads(line)
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  ]
  assert [r["step"] for r in rows if "reward/total" in r] == [1, 2]
  card = (tmp_path / "run" / "hf" / "README.md").read_text()
  assert "base_model: acme/tiny-llama" in card
