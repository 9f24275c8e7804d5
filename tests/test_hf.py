"""HF import/export: round trip through transformers, strictness, bad files."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tr
from hf_models import hf_logits, ragged_batch, tiny_hf, torch

from multians_jax import checkpoint, sharding, sources
from multians_jax.interop import hf, tensorfile


@pytest.mark.parametrize(
  "family,tied", [("llama", True), ("qwen2", False), ("qwen3", False)]
)
def test_export_round_trip(family, tied, tmp_path, one_device_mesh):
  ref = tiny_hf(family, tied=tied, heads=4, kv=2, theta=1e5)
  ref.save_pretrained(tmp_path / "src")
  ours, cfg, _ = hf.load(
    str(tmp_path / "src"), one_device_mesh, sharding.TRAIN_RULES
  )
  # Tiny shard limit: forces the sharded layout with an index file.
  hf.save(ours, str(tmp_path / "out"), max_shard_bytes=20_000)
  files = os.listdir(tmp_path / "out")
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 1
  info = tr.utils.logging.get_verbosity()
  with _no_weight_warnings():
    back = tr.AutoModelForCausalLM.from_pretrained(
      tmp_path / "out", dtype=torch.float32
    ).eval()
  tr.utils.logging.set_verbosity(info)
  ids, mask, pos = ragged_batch(101, [7, 3], 7)
  np.testing.assert_allclose(
    hf_logits(back, ids, mask, pos)[mask],
    hf_logits(ref, ids, mask, pos)[mask],
    atol=1e-5,
  )
  # And back into ours from the exported (sharded) directory.
  again, cfg2, _ = hf.load(
    str(tmp_path / "out"), one_device_mesh, sharding.TRAIN_RULES
  )
  assert cfg2 == cfg
  a, _ = ours(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
  b, _ = again(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _no_weight_warnings:
  """Fails if transformers logs missing/unexpected/newly initialised weights."""

  def __enter__(self):
    self.records = []
    import logging

    self.handler = logging.Handler()
    self.handler.emit = self.records.append
    self.logger = logging.getLogger("transformers")
    self.logger.addHandler(self.handler)
    tr.utils.logging.set_verbosity_info()

  def __exit__(self, *exc):
    self.logger.removeHandler(self.handler)
    bad = [
      r.getMessage()
      for r in self.records
      if any(
        w in r.getMessage().lower()
        for w in (
          "missing",
          "unexpected",
          "newly initialized",
          "not initialized",
          "not used",
        )
      )
    ]
    assert not bad, bad


def test_from_hf_config_rejects_unhandled_fields():
  base = tr.LlamaConfig(num_hidden_layers=1).to_dict()
  cfg = hf.from_hf_config(base)
  assert cfg.family == "llama"
  with pytest.raises(ValueError, match="rope scaling type 'yarn'"):
    hf.from_hf_config(
      {
        **base,
        "rope_parameters": {
          "rope_type": "yarn",
          "rope_theta": 1e4,
          "factor": 4.0,
        },
      }
    )
  with pytest.raises(ValueError, match="sliding"):
    hf.from_hf_config(
      {**tr.Qwen2Config().to_dict(), "use_sliding_window": True}
    )
  with pytest.raises(ValueError, match="attention_bias"):
    hf.from_hf_config({**base, "attention_bias": True})
  with pytest.raises(ValueError, match="mlp_bias"):
    hf.from_hf_config({**base, "mlp_bias": True})
  with pytest.raises(ValueError, match="some_new_field"):
    hf.from_hf_config({**base, "some_new_field": 3})
  with pytest.raises(ValueError, match="model_type 'gpt2'"):
    hf.from_hf_config(tr.GPT2Config().to_dict())


def test_truncated_safetensors_is_named(tmp_path, one_device_mesh):
  tiny_hf("llama").save_pretrained(tmp_path)
  f = tmp_path / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="truncated safetensors"):
    hf.load(str(tmp_path), one_device_mesh, sharding.TRAIN_RULES)


def test_missing_and_misshaped_tensors_are_named(tmp_path, one_device_mesh):
  tiny_hf("llama").save_pretrained(tmp_path)
  src = tensorfile.SafetensorsSource(str(tmp_path))
  tensors = {k: np.array(src.get(k)) for k in src.keys()}
  del tensors["model.layers.1.mlp.up_proj.weight"]
  tensorfile.write_safetensors(str(tmp_path / "model.safetensors"), tensors)
  with pytest.raises(ValueError, match="layers.1.mlp.up_proj"):
    hf.load(str(tmp_path), one_device_mesh, sharding.TRAIN_RULES)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["intermediate_size"] += 1
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="shape"):
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors[
      "model.layers.0.mlp.up_proj.weight"
    ]
    tensorfile.write_safetensors(str(tmp_path / "model.safetensors"), tensors)
    hf.load(str(tmp_path), one_device_mesh, sharding.TRAIN_RULES)


def test_checkpoint_import_restore_and_export(tmp_path, one_device_mesh):
  ref = tiny_hf("qwen3", heads=4, kv=2)
  ref.save_pretrained(tmp_path / "src")
  n = sources.import_model(
    str(tmp_path / "src"),
    str(tmp_path / "ck"),
    one_device_mesh,
    sharding.TRAIN_RULES,
  )
  assert n == sum(p.numel() for p in ref.parameters())
  with pytest.raises(FileExistsError):
    sources.import_model(
      str(tmp_path / "src"),
      str(tmp_path / "ck"),
      one_device_mesh,
      sharding.TRAIN_RULES,
    )
  m, cfg, _ = sources.load_model(
    str(tmp_path / "ck"), one_device_mesh, sharding.TRAIN_RULES
  )
  ids, mask, pos = ragged_batch(101, [5, 2], 5)
  got, _ = m(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
  np.testing.assert_allclose(
    np.asarray(got)[mask], hf_logits(ref, ids, mask, pos)[mask], atol=1e-4
  )
  with pytest.raises(FileNotFoundError):
    sources.load_model(
      str(tmp_path / "nothing"), one_device_mesh, sharding.TRAIN_RULES
    )
  for missing in ("nothing", "nope.gguf"):
    with pytest.raises(FileNotFoundError, match=missing):
      sources.load_tokenizer(str(tmp_path / missing))


def test_checkpointer_accepts_relative_paths(
  tmp_path, monkeypatch, one_device_mesh
):
  from multians_jax.model import transformer as model

  monkeypatch.chdir(tmp_path)
  cfg = model.ModelConfig("llama", 32, 16, 1, 2, 1, 8, 16)
  m = model.init_model(cfg, one_device_mesh, sharding.TRAIN_RULES)
  ck = checkpoint.Checkpointer("rel/ckpts", async_save=True)
  ck.save(1, m, items={"extra": {"x": m.final_norm[...]}})
  ck.wait()
  ck.close()
  assert (tmp_path / "rel" / "ckpts" / "1").is_dir()


@pytest.mark.slow
def test_import_and_parity_clis(tmp_path):
  """tools/hf_to_orbax.py then tools/check_parity.py against transformers."""
  import subprocess
  import sys

  import toy_task

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  ref = tiny_hf("llama", vocab=len(toy_task.VOCAB), tied=True, theta=1e5)
  ref.save_pretrained(tmp_path / "hf")
  toy_task.tokenizer().save_pretrained(tmp_path / "hf")
  run = lambda *a: subprocess.run(
    [sys.executable, *a], cwd=root, capture_output=True, text=True, timeout=300
  )
  out = run(
    "tools/hf_to_orbax.py", f"--src={tmp_path}/hf", f"--out={tmp_path}/ck"
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert "step 0" in out.stdout and "parameters" in out.stdout
  out = run(
    "tools/check_parity.py",
    f"--ckpt={tmp_path}/ck",
    f"--hf={tmp_path}/hf",
    "--prompt=<answer1>red</answer1> foo bar",
    "--prompt=foo",
    "--tol=1e-4",
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert "max_abs_diff=" in out.stdout
