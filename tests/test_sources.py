"""Model sources beyond local paths: a Hugging Face Hub id resolved from the
huggingface_hub cache (offline), and a remote (gs://) HF directory read in
place through etils.epath; each through loading, tools/sample.py and
training."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import remote_fs
import toy_task
from etils import epath
from flax import nnx
from hf_models import tiny_hf

from multians_jax import loop, sharding, sources
from multians_jax.config import RunConfig
from multians_jax.interop import hf, tensorfile
from multians_jax.model import transformer as model_lib

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
  assert sources.resolve("acme/tiny-llama") == ("hf", str(snap))
  at = sources.resolve(f"acme/tiny-llama@{COMMIT}")
  assert at == ("hf", str(snap))
  m, cfg, tok = sources.load_model(
    "acme/tiny-llama", one_device_mesh, sharding.TRAIN_RULES
  )
  assert cfg.vocab_size == len(toy_task.VOCAB) and tok is not None
  with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set"):
    sources.resolve("acme/not-cached")
  with pytest.raises(FileNotFoundError, match="not a checkpoint dir"):
    sources.resolve("no_such_dir")  # not an id: a missing local path


@pytest.mark.slow
def test_sample_cli_takes_a_hub_id(offline_hub):
  _hub_cache(offline_hub)
  env = dict(os.environ)
  out = subprocess.run(
    [
      sys.executable,
      "tools/sample.py",
      "--model=acme/tiny-llama",
      "--prompt=colours?",
      "--config.sampler.max_new_tokens=3",
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


@pytest.mark.slow
def test_training_from_a_hub_id(offline_hub, tmp_path):
  _hub_cache(offline_hub)
  c = toy_task.config(2)
  c.model.path = "acme/tiny-llama"
  c.model.arch = {}
  c.export.hf_dir = "hf"
  loop.train(
    RunConfig.from_dict(c.to_dict()),
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


# ---------------------------------------------------------------------------
# A remote HF directory (gs://), read in place through etils.epath.

URI = "gs://bucket/models/tiny-llama"


def _sharded_model(local):
  """A tiny random llama saved in several safetensors shards."""
  ref = tiny_hf("llama", vocab=len(toy_task.VOCAB), tied=True)
  ref.save_pretrained(local, max_shard_size="40KB")
  toy_task.tokenizer().save_pretrained(local)


def _remote_model(local):
  _sharded_model(local)
  remote_fs.upload(local, URI)


def test_remote_dir_loads_in_place_reading_each_byte_once(
  tmp_path, monkeypatch
):
  fs = remote_fs.install(monkeypatch)
  _remote_model(tmp_path / "local")
  assert len(list((tmp_path / "local").glob("*.safetensors"))) >= 3
  assert sources.resolve(URI) == ("hf", URI)
  mesh = sharding.make_mesh(2, 2, 2)  # heads, features and layers split
  m, cfg, tok = sources.load_model(URI, mesh, sharding.TRAIN_RULES)
  want, _, want_tok = sources.load_model(
    str(tmp_path / "local"), mesh, sharding.TRAIN_RULES
  )
  got, ref = jax.tree.leaves(nnx.state(m)), jax.tree.leaves(nnx.state(want))
  for a, b in zip(got, ref, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == b.sharding
  ids = tok("red, blue")["input_ids"]
  assert ids == want_tok("red, blue")["input_ids"] and tok.chat_template
  # Every tensor byte is read once, though several devices hold copies.
  with tensorfile.SafetensorsSource(URI) as src:
    tensor_bytes = src.nbytes
  read = sum(n for p, n in fs.reads.items() if p.endswith(".safetensors"))
  headers = read - tensor_bytes
  assert 0 < headers < 8 * 4096, (read, tensor_bytes)


def test_read_blocks_reads_only_the_rows_its_blocks_cover(
  tmp_path, monkeypatch
):
  """What a process of a pod slice holding part of each tensor reads."""
  fs = remote_fs.install(monkeypatch)
  _remote_model(tmp_path / "local")
  conf = json.loads((tmp_path / "local" / "config.json").read_text())
  cfg = hf.from_hf_config(conf)
  _, abs_state = nnx.split(model_lib.abstract_model(cfg))
  local = tensorfile.SafetensorsSource(str(tmp_path / "local"))
  with tensorfile.SafetensorsSource(URI) as src:
    for key, shape in hf._plan(cfg, abs_state):
      per = shape[1:] if key.ours.startswith("layers.") else shape
      name = key.hf.format(i=1)
      full = hf._to_ours(key.kind, np.asarray(local.get(name), np.float32), per)
      axis, inner = hf._ROWS[key.kind]
      n = per[axis]
      q = n // 4
      blocks = []
      for a, b in ((2 * q, 3 * q), (3 * q, n)):  # two devices' blocks
        index = [slice(None)] * len(per)
        index[axis] = slice(a, b)
        blocks.append(tuple(index))
      fs.reads.clear()
      got = hf.read_blocks(src, name, key.kind, per, blocks)
      for g, index in zip(got, blocks, strict=True):
        np.testing.assert_array_equal(g, full[index])
      row = 4 * full.size // n  # float32 files
      assert sum(fs.reads.values()) == row * (n - 2 * q), key
      if inner is not None and per[inner] > 1:  # a block splits a head
        odd = [slice(None)] * len(per)
        odd[axis] = slice(0, 1)
        odd[inner] = slice(0, 1)
        fs.reads.clear()
        (got,) = hf.read_blocks(src, name, key.kind, per, [tuple(odd)])
        np.testing.assert_array_equal(got, full[tuple(odd)])
        assert sum(fs.reads.values()) == 4 * full.size  # the whole tensor


def test_remote_dir_errors_name_the_problem(tmp_path, monkeypatch):
  remote_fs.install(monkeypatch)
  with pytest.raises(FileNotFoundError, match="nor an HF model dir"):
    sources.resolve("gs://bucket/nothing-here")
  _remote_model(tmp_path / "local")
  shard = sorted((tmp_path / "local").glob("*.safetensors"))[1]
  target = epath.Path(URI) / shard.name
  target.write_bytes(shard.read_bytes()[:-100])
  with pytest.raises(ValueError, match=f"{shard.name}: truncated"):
    sources.load_model(URI, sharding.make_mesh(), sharding.TRAIN_RULES)
  target.unlink()
  with pytest.raises(FileNotFoundError, match="named by the index but missing"):
    sources.load_model(URI, sharding.make_mesh(), sharding.TRAIN_RULES)


_CLI = """
import runpy, sys
sys.path.insert(0, "tests")
import remote_fs
remote_fs.install()
remote_fs.upload(sys.argv[1], sys.argv[2])
sys.argv = ["tools/sample.py", *sys.argv[3:]]
runpy.run_path("tools/sample.py", run_name="__main__")
"""


@pytest.mark.slow
def test_sample_cli_takes_a_remote_dir(tmp_path):
  _sharded_model(tmp_path / "local")  # uploaded in the subprocess
  out = subprocess.run(
    [
      sys.executable,
      "-c",
      _CLI,
      str(tmp_path / "local"),
      URI,
      f"--model={URI}",
      "--prompt=colours?",
      "--config.sampler.max_new_tokens=3",
      "--json",
    ],
    cwd=ROOT,
    check=True,
    capture_output=True,
    text=True,
  )
  row = json.loads(out.stdout.strip().splitlines()[-1])
  assert row["prompt"] and len(row["token_ids"]) == 3 and "completion" in row


@pytest.mark.slow
def test_training_from_a_remote_dir(tmp_path, monkeypatch):
  remote_fs.install(monkeypatch)
  _remote_model(tmp_path / "local")
  c = toy_task.config(2)
  c.model.path = URI
  c.model.arch = {}
  c.export.hf_dir = "hf"
  loop.train(
    RunConfig.from_dict(c.to_dict()),
    str(tmp_path / "run"),
    train_source=toy_task.records(8),
    eval_source=toy_task.records(4),
  )
  rows = [
    json.loads(line)
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  ]
  assert [r["step"] for r in rows if "reward/total" in r] == [1, 2]
  assert (tmp_path / "run" / "hf" / "model.safetensors").exists()


def test_gs_without_gcsfs_names_the_extra():
  try:
    import gcsfs  # noqa: F401
  except ImportError:
    pass
  else:
    pytest.skip("gcsfs is installed: gs:// would be read for real")
  with pytest.raises(ImportError, match=r"gcs extra \(pip install"):
    sources.resolve("gs://some-bucket/model")


def test_named_builtins_come_from_one_table():
  """The words a config may use for a model source are ``sources.BUILTINS``
  entries: a tokenizer-only one (the lab's) loads its tokenizer and is
  refused as a model by name; SmolLM2's arch and Hub id come with it."""

  tok = sources.load_tokenizer("distlab")
  assert tok("Cough , fever").input_ids  # a working tokenizer
  with pytest.raises(ValueError, match="'distlab' names .*not a model source"):
    sources.resolve("distlab")
  assert sources.arch_name("smollm2") == "smollm2_135m"
  assert sources.arch_name("/some/dir") == ""
  hub = "HuggingFaceTB/SmolLM2-135M-Instruct"
  assert sources.base_model("smollm2") == (hub, "apache-2.0")
