"""Weights & Biases logging (``log.wandb_*``): rows, config and images reach
an offline W&B run, a resumed WORKDIR keeps its run id, and nothing imports
wandb without a project or off process 0."""

import builtins
import dataclasses
import json
import math
import pathlib
import struct

import pytest

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

from multians_jax import telemetry  # noqa: E402
from multians_jax.config import RunConfig  # noqa: E402


@pytest.fixture
def offline(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.setenv("WANDB_DIR", str(tmp_path))
  monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
  monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
  monkeypatch.delenv("WANDB_RUN_ID", raising=False)
  return tmp_path


def _records(path):
  """The protobuf records of a ``.wandb`` file: a 7-byte W&B header, then
  LevelDB-log chunks (crc32, length, type; 32 KiB blocks)."""
  data = pathlib.Path(path).read_bytes()
  assert data[:4] == b":W&B", data[:7]
  block, pos, buf = 32768, 7, b""
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # block trailer: zero padding
      pos += block - pos % block
      continue
    _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
    buf += data[pos + 7 : pos + 7 + n]
    pos += 7 + n
    if kind in (1, 4):  # FULL or LAST chunk: one record
      rec = wandb_internal_pb2.Record()
      rec.ParseFromString(buf)
      buf = b""
      yield rec


def _offline_runs(root):
  return sorted(pathlib.Path(root).rglob("offline-run-*"))


def _read_run(run_dir):
  """(run record, {step: {key: value}}) of an offline run directory."""
  (path,) = run_dir.glob("run-*.wandb")
  run, history = None, {}
  for rec in _records(path):
    kind = rec.WhichOneof("record_type")
    if kind == "run":
      run = rec.run
    elif kind == "history":
      row = history.setdefault(rec.history.step.num, {})
      for item in rec.history.item:  # a media value: [key, field] items
        keys = [item.key] if item.key else list(item.nested_key)
        if keys[0].startswith("_"):  # _step, _runtime, _timestamp
          continue
        d = row
        for k in keys[:-1]:
          d = d.setdefault(k, {})
        d[keys[-1]] = json.loads(item.value_json)
  return run, history


def _tiny_run(**log):
  from configs import tiny

  c = tiny.get_config().to_dict()
  c["log"].update(log)
  return RunConfig.from_dict(c)


def test_rows_config_and_images_reach_the_offline_run(offline):
  from PIL import Image

  work = offline / "work"
  run = _tiny_run(wandb_project="test", wandb_mode="offline")
  assert (run.log.wandb_project, run.log.wandb_mode) == ("test", "offline")
  w = telemetry.Writer(
    str(work),
    tensorboard=False,
    wandb_project=run.log.wandb_project,
    wandb_entity=run.log.wandb_entity,
    wandb_mode=run.log.wandb_mode,
    config=dataclasses.asdict(run),  # what loop.train passes
  )
  w.write(1, {"loss": 1.5, "diverged": math.nan})
  w.write(1, {"coverage@4": 0.25}, prefix="eval/")
  w.write(2, {"loss": 0.5})
  png = offline / "reliability.png"
  Image.new("RGB", (4, 4)).save(png)
  w.log_files([str(png), str(offline / "missing.png")], step=2, prefix="eval/")
  w.close()

  (run_dir,) = _offline_runs(work)
  run_id = (work / "wandb_run_id").read_text().strip()
  assert run_dir.name.endswith(f"-{run_id}")
  rec, history = _read_run(run_dir)
  assert (rec.run_id, rec.project) == (run_id, "test")
  config = {u.key: json.loads(u.value_json) for u in rec.config.update}
  assert config["seed"] == run.seed
  assert config["mesh"] == run.to_dict()["mesh"]
  assert config["log"]["wandb_mode"] == "offline"
  assert history[1] == {"loss": 1.5, "eval/coverage@4": 0.25}  # no None
  assert history[2]["loss"] == 0.5
  image = history[2]["eval/reliability"]
  assert image["_type"] == "image-file" and image["width"] == 4
  assert (run_dir / "files" / image["path"]).is_file()
  assert "eval/missing" not in history[2]
  # The JSONL file is unchanged by W&B: every row, None for non-finite.
  rows = telemetry.read_jsonl(str(work / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 1, 2]
  assert rows[0]["diverged"] is None


def test_a_resumed_workdir_continues_the_same_run(offline):
  work = str(offline / "work")
  ids = []
  for step in (1, 2):
    w = telemetry.Writer(
      work, tensorboard=False, wandb_project="test", wandb_mode="offline"
    )
    w.write(step, {"loss": float(step)})
    w.close()
    ids.append((offline / "work" / "wandb_run_id").read_text().strip())
  assert ids[0] == ids[1] and ids[0]
  runs = _offline_runs(work)
  assert len(runs) == 2  # one offline directory per process start
  # offline-run-<time>-<id>, "-1" appended within the same second
  assert all(f"-{ids[0]}" in r.name for r in runs)
  assert {_read_run(r)[0].run_id for r in runs} == {ids[0]}


def _forbid_wandb_import(monkeypatch):
  real = builtins.__import__

  def guarded(name, *args, **kwargs):
    if name == "wandb" or name.startswith("wandb."):
      raise ImportError(f"No module named {name!r}")
    return real(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", guarded)


def test_no_project_or_not_process_0_never_imports_wandb(offline, monkeypatch):
  _forbid_wandb_import(monkeypatch)
  w = telemetry.Writer(str(offline / "a"), tensorboard=False)
  w.write(1, {"loss": 1.0})
  w.log_files([])
  w.close()
  monkeypatch.setattr(telemetry.jax, "process_index", lambda: 1)
  w = telemetry.Writer(
    str(offline / "b"), tensorboard=False, wandb_project="test"
  )
  w.write(1, {"loss": 1.0})
  w.close()
  assert not (offline / "b").exists()
  assert not _offline_runs(offline)


def test_a_project_without_wandb_names_the_extra(offline, monkeypatch):
  _forbid_wandb_import(monkeypatch)
  with pytest.raises(ImportError, match=r'pip install -e "\.\[wandb\]"'):
    telemetry.Writer(
      str(offline / "work"), tensorboard=False, wandb_project="test"
    )


def test_wandb_mode_is_validated():
  assert _tiny_run().log.wandb_project == ""  # off by default
  assert _tiny_run().log.wandb_mode == "online"
  with pytest.raises(ValueError, match="log.wandb_mode"):
    _tiny_run(wandb_mode="cloud")
