"""LoRA: the function at init, adapters-only gradients and optimizer state,
exact micro-batching and sharding, checkpoints of the adapters alone, merged
and PEFT exports against transformers, and learning on the toy task."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import toy_task
from flax import nnx

from multians_jax import (
  checkpoint,
  config,
  loop,
  policy,
  sharding,
  sources,
  telemetry,
)
from multians_jax.interop import hf
from multians_jax.model import layers, lora
from multians_jax.model import transformer as model_lib
from multians_jax.rl import update

CFG = model_lib.ModelConfig("llama", 64, 32, 2, 4, 2, 8, 48)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)))
POS = jnp.tile(jnp.arange(9)[None], (2, 1))
MASK = jnp.ones((2, 9), bool)


def _logits(m):
  return np.asarray(m(TOKENS, POS, MASK)[0])


def _is_b(path) -> bool:
  names = (str(getattr(k, "key", getattr(k, "name", ""))) for k in path)
  return any(n.endswith("_lora_b") for n in names)


def _perturbed(m, seed=3, scale=0.05):
  """The model with random non-zero B matrices (a trained adapter)."""
  rng = np.random.default_rng(seed)
  bump = lambda path, x: (
    x + scale * jnp.asarray(rng.normal(size=x.shape), x.dtype)
    if _is_b(path)
    else x
  )
  state = jax.tree_util.tree_map_with_path(bump, nnx.state(m, nnx.Param))
  return nnx.merge(nnx.graphdef(m), state)


@pytest.mark.parametrize(
  "family,extra",
  [("llama", {}), ("qwen2", {"qkv_bias": True}), ("qwen3", {"qk_norm": True})],
)
@pytest.mark.slow
def test_fresh_adapters_keep_the_base_function(family, extra, one_device_mesh):
  cfg = CFG.replace(family=family, **extra)
  base = model_lib.init_model(cfg, one_device_mesh, sharding.TRAIN_RULES, 1)
  m = lora.add(base, 4, 8.0, "all", seed=2)
  layers = m.layers.arrays()
  assert layers["wq_lora_a"].shape == (2, 32, 4)
  assert layers["wq_lora_b"].shape == (2, 4, 4, 8)
  assert layers["wo_lora_a"].shape == (2, 4, 8, 4)  # wo contracts (N, H)
  assert layers["w_down_lora_b"].shape == (2, 4, 32)
  assert layers["wq_lora_a"].dtype == jnp.float32
  assert float(jnp.abs(layers["wq_lora_a"]).max()) > 0  # A random, B zero
  np.testing.assert_allclose(_logits(m), _logits(base), atol=1e-6)
  assert not np.allclose(_logits(_perturbed(m)), _logits(base), atol=1e-3)


@pytest.mark.slow
def test_adapters_compute_the_low_rank_update(one_device_mesh):
  """y = x·W + (alpha / r)·x·A·B, by hand on one projection: the merged
  model (W + scale·A·B) computes what the adapted one does."""
  base = model_lib.init_model(CFG, one_device_mesh, sharding.TRAIN_RULES, 1)
  m = _perturbed(lora.add(base, 2, 6.0, "q_proj,down_proj", seed=4))
  assert m.cfg.lora_targets == ("wq", "w_down")
  p = m.layers.arrays()
  x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 3, 32)), jnp.float32)
  pl = {k: v[0] for k, v in p.items()}
  got = layers.project(m.cfg, x, pl, "wq", (4, 8))
  a, b, w = np.asarray(pl["wq_lora_a"]), np.asarray(pl["wq_lora_b"]), pl["wq"]
  want = np.einsum("btd,dnh->btnh", x, w) + 3.0 * np.einsum(
    "btd,dr,rnh->btnh", x, a, b
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  merged = lora.merge(m)
  assert merged.cfg.lora_rank == 0
  assert set(merged.layers.arrays()) == set(base.layers.arrays())
  np.testing.assert_allclose(_logits(merged), _logits(m), atol=1e-5)


def test_bad_lora_config_is_named():
  with pytest.raises(ValueError, match="unknown projection 'qproj'"):
    CFG.replace(lora_rank=4, lora_targets="qproj")
  with pytest.raises(ValueError, match="lora_rank must be >= 0"):
    CFG.replace(lora_rank=-1)
  with pytest.raises(ValueError, match="lora_targets is empty"):
    CFG.replace(lora_rank=4, lora_targets="")
  c = toy_task.config(2)
  c.model.lora_rank = 4
  c.model.lora_targets = "wq,mlp"
  with pytest.raises(ValueError, match="unknown projection 'mlp'"):
    config.RunConfig.from_dict(c.to_dict())
  c.model.lora_targets = "all"
  c.model.arch.lora_rank = 4
  with pytest.raises(ValueError, match="use model.lora_rank"):
    config.RunConfig.from_dict(c.to_dict())


def _rollout(b=8, t=6, n=5, seed=0):
  from multians_jax.model import sampler

  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, n + 1, b)
  comp = np.arange(n)[None] < lengths[:, None]
  return sampler.Rollout(
    prompt_tokens=jnp.asarray(rng.integers(3, 64, (b, t)), jnp.int32),
    prompt_mask=jnp.ones((b, t), bool),
    tokens=jnp.asarray(rng.integers(3, 64, (b, n)) * comp, jnp.int32),
    logprobs=jnp.asarray(-rng.uniform(2, 6, (b, n)) * comp, jnp.float32),
    mask=jnp.asarray(comp),
    lengths=jnp.asarray(lengths, jnp.int32),
    truncated=jnp.asarray(lengths == n),
  )


def _step(mesh, micro, tx, steps=1):
  base = model_lib.init_model(CFG, mesh, sharding.TRAIN_RULES, seed=1)
  m = lora.add(base, 4, 8.0, "all", seed=2)
  adv = jnp.asarray(np.random.default_rng(2).normal(size=8), jnp.float32)
  batch = update.place_batch(update.make_batch(_rollout(), adv), mesh)
  ucfg = update.UpdateConfig(micro_batches=micro, temperature=0.7)
  state = update.init_state(m, tx)
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(state.params))
  with sharding.activate(mesh, sharding.TRAIN_RULES):
    for _ in range(steps):
      state, metrics = update.update_step(
        nnx.graphdef(m), state, batch, tx=tx, cfg=ucfg
      )
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(state.params))
  return state, before, after, jax.device_get(metrics)


@pytest.mark.slow
def test_update_trains_only_the_adapters(one_device_mesh):
  tx = update.optimizer(update.OptimConfig(lr=1e-2))
  state, before, after, _ = _step(one_device_mesh, 2, tx, steps=2)
  changed = {
    k
    for k in before["layers"]
    if not np.array_equal(before["layers"][k], after["layers"][k])
  }
  adapters = {k for k in before["layers"] if "_lora_" in k}
  assert changed == adapters  # every adapter (A and B) moved, nothing else
  for k in ("embed", "final_norm"):
    np.testing.assert_array_equal(before[k], after[k])
  # The optimizer holds moments of the adapters alone.
  n_adapter = sum(before["layers"][k].size for k in adapters)
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  assert sum(x.size for x in moments) == 2 * n_adapter


@pytest.mark.slow
def test_lora_micro_batches_and_sharding_are_exact(one_device_mesh):
  sgd = optax.sgd(1.0)
  _, _, full, m1 = _step(one_device_mesh, 1, sgd)
  _, _, micro, m4 = _step(one_device_mesh, 4, sgd)
  _, _, shard, ms = _step(sharding.make_mesh(2, 2, 2), 2, sgd)
  flat = lambda t: jax.tree.leaves(t)
  for a, b, c in zip(flat(full), flat(micro), flat(shard), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
  np.testing.assert_allclose(m1["loss"], ms["loss"], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("compress", [True, False])
def test_checkpoint_holds_the_base_once_and_adapters_per_step(
  tmp_path, one_device_mesh, compress
):
  base = model_lib.init_model(CFG, one_device_mesh, sharding.TRAIN_RULES, 1)
  m = _perturbed(lora.add(base, 4, 8.0, "wq,wv", seed=2))
  ck = checkpoint.Checkpointer(
    str(tmp_path / "ck"), async_save=False, compress=compress
  )
  ck.save(1, m)
  m2 = _perturbed(m, seed=9)
  ck.save(2, m2)
  ck.close()
  assert (tmp_path / "ck" / checkpoint.BASE_DIR).is_dir()
  size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
  step_params = size(tmp_path / "ck" / "2" / "params")
  n_base = model_lib.param_count(CFG)
  assert step_params < 0.5 * 4 * n_base  # adapters only (base ≈ 13 k floats)
  for step, want in ((1, m), (2, m2)):
    (
      got,
      _,
      _,
    ) = sources.load_model(
      str(tmp_path / "ck"), one_device_mesh, sharding.TRAIN_RULES, step=step
    )
    assert got.cfg == want.cfg
    np.testing.assert_array_equal(_logits(got), _logits(want))
  # A LoRA checkpoint without its base is named, not misread.
  os.rename(tmp_path / "ck" / "base", tmp_path / "ck" / "moved")
  with pytest.raises(FileNotFoundError, match="frozen base"):
    sources.load_model(
      str(tmp_path / "ck"), one_device_mesh, sharding.TRAIN_RULES
    )


@pytest.mark.slow
def test_load_policy_adds_keeps_or_replaces_adapters(tmp_path, one_device_mesh):
  base = model_lib.init_model(CFG, one_device_mesh, sharding.TRAIN_RULES, 1)
  trained = _perturbed(lora.add(base, 4, 8.0, "all", seed=2))
  ck = checkpoint.Checkpointer(str(tmp_path / "ck"), async_save=False)
  ck.save(0, trained, tokenizer=toy_task.tokenizer())
  ck.close()
  src = config.ModelSource(path=str(tmp_path / "ck"), lora_rank=4, lora_alpha=8)
  same, _ = policy.load_policy(src, one_device_mesh, 0)  # resumes the adapters
  np.testing.assert_array_equal(_logits(same), _logits(trained))
  assert same.cfg.lora_rank == 4
  other = src.__class__(path=src.path, lora_rank=2, lora_targets="wq")
  fresh, _ = policy.load_policy(other, one_device_mesh, 0)  # merged + new
  assert fresh.cfg.lora_rank == 2 and fresh.cfg.lora_targets == ("wq",)
  np.testing.assert_allclose(_logits(fresh), _logits(trained), atol=1e-5)
  full = src.__class__(path=src.path)  # lora_rank 0: full fine-tuning
  merged, _ = policy.load_policy(full, one_device_mesh, 0)
  assert merged.cfg.lora_rank == 0
  np.testing.assert_allclose(_logits(merged), _logits(trained), atol=1e-5)


@pytest.mark.slow
def test_merged_and_peft_exports_match_transformers(tmp_path, one_device_mesh):
  """The merged export loads in transformers with our logits; the PEFT
  export on the base model (peft.PeftModel) gives them too."""
  peft = pytest.importorskip("peft")
  torch = pytest.importorskip("torch")
  import transformers as tr
  from hf_models import hf_logits, ragged_batch

  cfg = CFG.replace(family="qwen2", qkv_bias=True, vocab_size=101)
  base = model_lib.init_model(cfg, one_device_mesh, sharding.TRAIN_RULES, 1)
  m = _perturbed(lora.add(base, 4, 8.0, "all", seed=2), scale=0.2)
  hf.save(base, str(tmp_path / "base"))
  hf.save(m, str(tmp_path / "merged"))
  hf.save_adapters(m, str(tmp_path / "adapter"), base_model="base")
  ids, mask, pos = ragged_batch(101, [9, 4], 9)
  ours = np.asarray(m(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))[0])
  merged = tr.AutoModelForCausalLM.from_pretrained(
    tmp_path / "merged", dtype=torch.float32
  ).eval()
  np.testing.assert_allclose(
    hf_logits(merged, ids, mask, pos)[mask], ours[mask], atol=1e-4
  )
  hf_base = tr.AutoModelForCausalLM.from_pretrained(
    tmp_path / "base", dtype=torch.float32
  ).eval()
  with_adapter = peft.PeftModel.from_pretrained(
    hf_base, str(tmp_path / "adapter")
  ).eval()
  np.testing.assert_allclose(
    hf_logits(with_adapter, ids, mask, pos)[mask], ours[mask], atol=1e-4
  )
  adapter_cfg = tmp_path / "adapter" / "adapter_config.json"
  cfg_json = json.loads(adapter_cfg.read_text())
  assert cfg_json["r"] == 4 and "o_proj" in cfg_json["target_modules"]
  with pytest.raises(ValueError, match="no LoRA adapters"):
    hf.save_adapters(base, str(tmp_path / "none"))


def _toy_lora(workdir, steps=16, seed=None, lr=None):
  """LoRA RL on the toy task from a frozen base checkpoint.

  The base is the toy task's random model with its (tied) embeddings
  scaled ×5: at the usual 0.02 init the frozen head bounds every logit
  near zero, so no change of the hidden states (all that adapters on the
  projections can make) moves the output distribution; a pretrained
  model's head is not so flat.
  """
  c = toy_task.config(steps)
  if seed is not None:
    c.seed = seed
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh()
  base = model_lib.init_model(
    model_lib.ModelConfig(**dict(c.model.arch)), mesh, sharding.TRAIN_RULES,
    seed=c.seed,
  )  # fmt: skip
  base.embed[...] = 5.0 * base.embed[...]
  ck = checkpoint.Checkpointer(str(workdir / "base"), async_save=False)
  ck.save(0, base, tokenizer=toy_task.tokenizer())
  ck.close()
  c.model.path = str(workdir / "base")
  c.model.lora_rank = 4
  c.model.lora_alpha = 8.0
  c.optim.lr = lr or 3e-2
  loop.train(
    config.RunConfig.from_dict(c.to_dict()),
    str(workdir / "run"),
    train_source=toy_task.records(8),
    eval_source=toy_task.records(4),
    tokenizer=toy_task.tokenizer(),
  )
  rows = telemetry.read_jsonl(str(workdir / "run" / "metrics.jsonl"))
  return [r["reward/total"] for r in rows if "reward/total" in r]


# LoRA on the toy task learns more slowly than full fine-tuning and its
# plateau depends on the seed: the rise (last 4 − first 4 of 16 steps) over
# seeds 0-4 was 0.21 ± 0.05 (min 0.16) (2026-12-06, AMD EPYC; 32 steps or
# lr 0.1 only widened the spread: 0.34 ± 0.36, 0.26 ± 0.14). So the test
# asserts on the mean of 3 seeds (0, 1, 2: 0.28, 0.25, 0.20): its spread is
# 0.05 / √3 = 0.03, and the threshold 0.1 is 4.7 of those below the
# 5-seed mean. tests/measure_margins.py lora re-measures.
LORA_SEEDS = (0, 1, 2)
LORA_THRESHOLD = 0.1


def _lora_rises(tmp_path):
  out = []
  for seed in LORA_SEEDS:
    rewards = _toy_lora(tmp_path / f"s{seed}", seed=seed)
    out.append(np.mean(rewards[-4:]) - np.mean(rewards[:4]))
  return out


@pytest.mark.slow
def test_lora_learns_the_toy_task(tmp_path):
  rises = _lora_rises(tmp_path)
  assert np.mean(rises) > LORA_THRESHOLD, rises
  m, meta, _ = toy_task.restore(str(tmp_path / "s0" / "run"))
  assert meta["step"] == 16 and m.cfg.lora_rank == 4
  base, _, _ = sources.load_model(
    str(tmp_path / "s0" / "base"), m.layers.wq[...].sharding.mesh,
    sharding.TRAIN_RULES,
  )  # fmt: skip
  for k, v in base.layers.arrays().items():  # the base never moved
    np.testing.assert_array_equal(np.asarray(m.layers.arrays()[k]), v)


@pytest.mark.slow
def test_lora_learning_test_fails_without_the_adapter_path(
  tmp_path, monkeypatch
):
  """The learning test's guard: with the adapter term dropped from the
  forward (so adapters get no gradient), the reward does not rise."""
  plain = layers.linear

  def no_adapters(cfg, x, p, name, out_shape):
    return plain(x, p[name].astype(model_lib.DTYPES[cfg.dtype]), out_shape)

  monkeypatch.setattr(layers, "project", no_adapters)
  jax.clear_caches()  # no step compiled with the real forward is reused
  rises = _lora_rises(tmp_path)
  assert np.mean(rises) <= LORA_THRESHOLD, rises


@pytest.mark.slow
def test_kl_reference_is_the_initial_policy(tmp_path, one_device_mesh):
  """Under LoRA the KL reference is the current base with the adapters the
  run started from: zero B for fresh adapters (the base model), the
  source's trained ones when a LoRA checkpoint is continued."""
  base = model_lib.init_model(CFG, one_device_mesh, sharding.TRAIN_RULES, 1)
  trained = _perturbed(lora.add(base, 4, 8.0, "all", seed=2))
  graphdef = nnx.graphdef(trained)
  params = nnx.state(trained, nnx.Param)
  ref_of = policy.reference(None, one_device_mesh, None, params)
  later = _perturbed(trained, seed=11)  # the policy after some updates
  ref = nnx.merge(graphdef, ref_of(nnx.state(later, nnx.Param)))
  np.testing.assert_array_equal(_logits(ref), _logits(trained))
  fresh = lora.add(base, 4, 8.0, "all", seed=2)
  ref_of = policy.reference(None, one_device_mesh, None, nnx.state(fresh))
  ref = nnx.merge(graphdef, ref_of(nnx.state(later, nnx.Param)))
  np.testing.assert_allclose(_logits(ref), _logits(base), atol=1e-6)


@pytest.mark.slow
def test_resume_with_other_lora_settings_is_refused(tmp_path, one_device_mesh):
  base = model_lib.init_model(CFG, one_device_mesh, sharding.TRAIN_RULES, 1)
  m = lora.add(base, 4, 8.0, "all", seed=2)
  ck = checkpoint.Checkpointer(str(tmp_path / "ck"), async_save=False)
  ck.save(1, m)
  ck.close()
  policy.check_same_adapters(str(tmp_path / "ck"), m.cfg)  # the same: fine
  for other in (m.cfg.replace(lora_alpha=16.0), base.cfg):
    with pytest.raises(ValueError, match="use the same model.lora_"):
      policy.check_same_adapters(str(tmp_path / "ck"), other)


@pytest.mark.slow
def test_float32_merge_keeps_updates_a_bfloat16_merge_rounds(one_device_mesh):
  cfg = CFG.replace(param_dtype="bfloat16")
  base = model_lib.init_model(cfg, one_device_mesh, sharding.TRAIN_RULES, 1)
  m = _perturbed(lora.add(base, 4, 8.0, "wq", seed=2), scale=1e-4)
  exact = lora.merged_weight(
    m.cfg, *(m.layers.arrays()[k] for k in ("wq", "wq_lora_a", "wq_lora_b")),
    jnp.float32,
  )  # fmt: skip
  merged32 = lora.merge(m, "float32").layers.wq[...]
  merged16 = lora.merge(m).layers.wq[...]
  assert merged32.dtype == jnp.float32 and merged16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(merged32), np.asarray(exact))
  w = np.asarray(base.layers.wq[...], np.float32)
  kept = lambda x: np.mean(np.asarray(x, np.float32) != w)
  assert kept(merged32) > 0.9 > 0.5 > kept(merged16)
