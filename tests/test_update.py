"""Update step: exact micro-batching, sharding, non-finite skips, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from multians_jax import loop, sharding
from multians_jax.config import RunConfig
from multians_jax.model import sampler
from multians_jax.model import support as support_lib
from multians_jax.model import transformer as model
from multians_jax.rl import loss, update

CFG = model.ModelConfig("llama", 64, 32, 2, 4, 2, 8, 48, qk_norm=False)


def _rollout(b=8, t=6, n=5, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, n + 1, b)
  comp = np.arange(n)[None] < lengths[:, None]
  pmask = np.ones((b, t), bool)
  pmask[::2, :2] = False  # left padding on some rows
  return sampler.Rollout(
    prompt_tokens=jnp.asarray(rng.integers(3, 64, (b, t)), jnp.int32),
    prompt_mask=jnp.asarray(pmask),
    tokens=jnp.asarray(rng.integers(3, 64, (b, n)) * comp, jnp.int32),
    logprobs=jnp.asarray(-rng.uniform(2, 6, (b, n)) * comp, jnp.float32),
    mask=jnp.asarray(comp),
    lengths=jnp.asarray(lengths, jnp.int32),
    truncated=jnp.asarray(lengths == n),
  )


def _step(mesh, micro, tx, adv=None, agg="token_mean", **loss_kw):
  m = model.init_model(CFG, mesh, sharding.TRAIN_RULES, seed=1)
  r = _rollout()
  if adv is None:
    adv = jnp.asarray(np.random.default_rng(2).normal(size=8), jnp.float32)
  batch = update.place_batch(update.make_batch(r, adv), mesh)
  ucfg = update.UpdateConfig(
    loss=loss.LossConfig(loss_agg=agg, max_len_norm=5, **loss_kw),
    micro_batches=micro,
    temperature=0.7,
    logprob_chunk=3,
  )
  state = update.init_state(m, tx)
  with sharding.activate(mesh, sharding.TRAIN_RULES):
    new, metrics = update.update_step(
      nnx.graphdef(m), state, batch, tx=tx, cfg=ucfg
    )
  flat = [np.asarray(x) for x in jax.tree.leaves(new.params)]
  return new, flat, jax.device_get(metrics)


@pytest.mark.parametrize("agg", ["seq_mean_token_mean"])
@pytest.mark.slow
def test_micro_batches_equal_full_batch(agg, one_device_mesh):
  sgd = optax.sgd(1.0)  # new params = params − grad: compares gradients
  _, full, m1 = _step(one_device_mesh, 1, sgd, agg=agg)
  _, micro, m4 = _step(one_device_mesh, 4, sgd, agg=agg)
  for a, b in zip(full, micro, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(m1["loss"], m4["loss"], atol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)


def test_entropy_bonus_raises_the_policys_entropy(one_device_mesh):
  """With zero advantages the only gradient is the bonus's: a step of
  gradient descent raises the entropy of the distributions the update
  scores (and β_H = 0 leaves the parameters alone)."""
  sgd = optax.sgd(0.5)
  zero = jnp.zeros(8, jnp.float32)
  before, _, m0 = _step(one_device_mesh, 1, sgd, adv=zero)
  bonus, _, _ = _step(one_device_mesh, 1, sgd, adv=zero, entropy_coef=1.0)
  r = _rollout()
  batch = update.place_batch(update.make_batch(r, zero), one_device_mesh)
  ucfg = update.UpdateConfig(temperature=0.7, logprob_chunk=3)
  graphdef = nnx.graphdef(model.abstract_model(CFG))

  def entropy(state):
    m = nnx.merge(graphdef, state.params)
    with sharding.activate(one_device_mesh, sharding.TRAIN_RULES):
      _, ent = update._completion_logp(graphdef, nnx.state(m), batch, ucfg)
    return float(jnp.sum(ent * batch.comp_mask) / jnp.sum(batch.comp_mask))

  assert float(m0["grad_norm"]) == 0.0  # nothing to learn without it
  assert entropy(bonus) > entropy(before) + 1e-3


@pytest.mark.slow
def test_sharded_update_equals_single_device(one_device_mesh):
  tx = update.optimizer(update.OptimConfig(lr=1e-2))
  _, single, ms = _step(one_device_mesh, 2, tx)
  new, sharded, mm = _step(sharding.make_mesh(2, 2, 2), 2, tx)
  assert not new.params["layers"]["w_up"][...].sharding.is_fully_replicated
  for a, b in zip(single, sharded, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_allclose(ms["loss"], mm["loss"], atol=1e-6)


@pytest.mark.slow
def test_per_token_advantages_update(one_device_mesh):
  """[B, L] advantages (rl.credit='answer'): equal to [B] ones when constant
  along L; micro-batched and sharded steps equal the single full batch."""
  sgd = optax.sgd(1.0)
  rng = np.random.default_rng(3)
  row = jnp.asarray(rng.normal(size=8), jnp.float32)
  _, by_row, _ = _step(one_device_mesh, 1, sgd, adv=row)
  tiled = jnp.tile(row[:, None], (1, 5))
  _, by_tok, _ = _step(one_device_mesh, 1, sgd, adv=tiled)
  for a, b in zip(by_row, by_tok, strict=True):
    np.testing.assert_array_equal(a, b)
  tok = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
  _, full, m1 = _step(one_device_mesh, 1, sgd, adv=tok)
  _, micro, m4 = _step(one_device_mesh, 4, sgd, adv=tok)
  _, sharded, ms = _step(sharding.make_mesh(2, 2, 2), 2, sgd, adv=tok)
  assert not np.allclose(full[0], by_row[0])  # the token values matter
  for a, b, c in zip(full, micro, sharded, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-5)
  np.testing.assert_allclose(m1["loss"], m4["loss"], atol=1e-6)
  np.testing.assert_allclose(m1["loss"], ms["loss"], atol=1e-6)


@pytest.mark.parametrize("group_size", [1, 8])  # per-row / shared prompts
@pytest.mark.slow
def test_truncated_sampling_stays_on_policy(one_device_mesh, group_size):
  """top_p = 0.8: the update scores the sampled tokens on the sampler's
  support, so the first importance ratio is 1 (mean within 1e-3) and the
  logged sampler/trainer log-prob difference is ≈ 0 in fp32. Scored on the
  full vocabulary instead (the known bias this removes) every ratio is the
  kept mass, and the mean is far below 1."""
  m = model.init_model(CFG, one_device_mesh, sharding.TRAIN_RULES, seed=1)
  rng = np.random.default_rng(0)
  prompts = jnp.asarray(rng.integers(3, 64, (4, 6)), jnp.int32)
  scfg = sampler.SamplingConfig(12, temperature=1.0, top_p=0.8)
  r = sampler.sample(
    m, prompts, prompts > 0, jax.random.key(3), scfg, num_samples=8
  )
  batch = update.make_batch(r, jnp.zeros((32,), jnp.float32))
  state = update.init_state(m, optax.sgd(0.0))

  def metrics(support):
    ucfg = update.UpdateConfig(
      micro_batches=2, temperature=1.0, logprob_chunk=5,
      group_size=group_size, support=support,
    )  # fmt: skip
    st = jax.tree.map(jnp.copy, state)  # the step donates its state
    _, out = update.update_step(
      nnx.graphdef(m), st, batch, tx=optax.sgd(0.0), cfg=ucfg
    )
    return jax.device_get(out)

  on = metrics(support_lib.Support(top_p=0.8))
  assert abs(on["ratio_mean"] - 1.0) < 1e-3
  assert on["logp_diff_max"] < 1e-4 and on["logp_diff_mean"] < 1e-5
  off = metrics(support_lib.Support())
  assert off["ratio_mean"] < 0.95
  assert off["logp_diff_mean"] > 0.05


@pytest.mark.slow
def test_non_finite_update_is_skipped(one_device_mesh):
  tx = update.optimizer(update.OptimConfig(lr=1e-2))
  m = model.init_model(CFG, one_device_mesh, sharding.TRAIN_RULES, seed=1)
  before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(m, nnx.Param))]
  adv = jnp.full((8,), jnp.nan)
  new, after, metrics = _step(one_device_mesh, 2, tx, adv=adv)
  assert metrics["update_skipped"] == 1.0
  assert int(new.step) == 0 and int(new.skipped) == 1
  for a, b in zip(before, after, strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("max_norm", [0.5, 50.0])  # clipped, not clipped
def test_clip_by_global_norm_matches_optax(max_norm):
  rng = np.random.default_rng(0)
  g = {"a": jnp.asarray(rng.normal(size=(7, 5)), jnp.float32),
       "b": jnp.asarray(rng.normal(size=(11,)), jnp.float32)}  # fmt: skip
  ours, theirs = (
    update.clip_by_global_norm(max_norm),
    optax.clip_by_global_norm(max_norm),
  )
  got, state = ours.update(g, ours.init(g))
  want, want_state = theirs.update(g, theirs.init(g))
  assert type(state) is type(want_state)  # checkpoints keep their layout
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(x, y, rtol=2e-7, atol=0)
  norm = float(optax.tree.norm(got))
  assert norm == pytest.approx(min(max_norm, float(optax.tree.norm(g))), 1e-6)


def test_optimizer_step_updates_the_state_in_place():
  """The optimizer step (clip, AdamW, the non-finite guard) needs no
  buffer of the parameters' size beyond the donated state: XLA's own
  count of the compiled step's temporaries, compiled (not run) for a
  model of 9M parameters. A select of the new state against the old, or
  optax's per-element clip select, each need one."""
  cfg = model.ModelConfig("llama", 4096, 256, 4, 8, 4, 32, 1024)
  tx = update.optimizer(update.OptimConfig(lr=1e-2, grad_clip=1.0))
  params = nnx.state(model.abstract_model(cfg), nnx.Param)
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)
  state = update.TrainState(
    scalar(jnp.int32), params, jax.eval_shape(tx.init, params),
    scalar(jnp.int32),
  )  # fmt: skip
  sums = dict.fromkeys(("tokens", "logp_diff_max", "entropy"), scalar("f4"))
  acc = (params, scalar(jnp.float32), sums)
  mem = update._apply_jit.lower(state, acc, tx=tx).compile().memory_analysis()
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  assert mem.temp_size_in_bytes < 0.05 * param_bytes, (
    mem.temp_size_in_bytes, param_bytes,
  )  # fmt: skip


def test_schedules_hand_computed():
  s = update.schedule(
    update.OptimConfig(
      lr=1.0, schedule="linear", warmup_steps=4, total_steps=14
    )
  )
  np.testing.assert_allclose(
    [float(s(i)) for i in (0, 3, 4, 9, 14)],
    [0.25, 1.0, 1.0, 0.5, 0.0],
    atol=1e-6,
  )
  c = update.schedule(
    update.OptimConfig(lr=2.0, schedule="cosine", total_steps=10)
  )
  np.testing.assert_allclose(
    [float(c(i)) for i in (0, 5, 10)], [2.0, 1.0, 0.0], atol=1e-6
  )
  k = update.schedule(update.OptimConfig(lr=3.0))
  assert float(k(0)) == float(k(100)) == 3.0


def test_run_config_errors_name_the_key():
  from configs import tiny

  good = tiny.get_config().to_dict()
  assert RunConfig.from_dict(good).rl.micro_batches == 2

  def bad(section, key, value, match):
    c = tiny.get_config().to_dict()
    c[section][key] = value
    with pytest.raises(ValueError, match=match):
      RunConfig.from_dict(c)

  bad("rl", "loss_agg", "sum", "loss_agg")
  bad("rl", "micro_batches", 3, "rl.micro_batches")
  bad("optim", "schedule", "step", "optim.schedule")
  bad("optim", "lr", -1.0, "optim.lr")
  bad("reward", "correctness", "most", "correctness")
  bad("sampler", "top_p", 0.0, "top_p")
  bad("rl", "num_iterations", 0, "rl.num_iterations")
  c = tiny.get_config().to_dict()
  c["extra"] = {}
  with pytest.raises(ValueError, match="extra"):
    RunConfig.from_dict(c)


@pytest.mark.parametrize(
  "name,arg",
  [("demo", None), ("tiny", None), ("qwen3_1_7b_gpu", None)]
  + [("lab", arm) for arm in ("rlvr", "rlcr", "multi_rlvr", "multi_rlcr")]
  + [("study_countries", arm) for arm in ("rlvr", "multi_rlcr", "base")]
  + [("lab", "base")]
  + [
    (f"qwen3_8b_{m}", hw)
    for m in ("multi_rlcr", "multi_rlvr", "rlcr", "rlvr")
    for hw in ("v5p", "gpu8")
  ],
)
def test_every_config_validates(name, arg):
  import importlib

  cfg = importlib.import_module(f"configs.{name}").get_config(arg)
  run = RunConfig.from_dict(cfg.to_dict())
  assert run.steps >= 1 or arg == "base"  # base: warm-up only
  if name.startswith("qwen3_8b"):
    assert run.rl.num_generations == 32 and run.optim.lr == 1e-6
    assert run.seed == 43 and run.sampling.max_new_tokens == 1536


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["multi_rlcr", "multi_rlvr", "rlcr", "rlvr"])
def test_paper_config_runs_two_steps_with_a_tiny_stand_in(tmp_path, mode):
  """A paper config (Qwen3-8B, DDXPlus) keeps its settings (reward, loss,
  advantages, micro-batching, chunked sampling, remat, bf16 compute) and
  runs 2 steps with a tiny random Qwen3 decoder and small sizes."""
  import importlib

  cfg = importlib.import_module(f"configs.qwen3_8b_{mode}").get_config("gpu8")
  cfg.steps = 2
  cfg.mesh.fsdp = -1
  cfg.model.path = "random"
  cfg.model.tokenizer = "smollm2"
  cfg.model.arch.update(
    family="qwen3", d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, d_ff=64, vocab_size=49152, tie_embeddings=False,
  )  # fmt: skip
  cfg.data.prompts_per_step, cfg.rl.num_generations = 2, 4
  cfg.rl.micro_batches, cfg.rl.sample_chunk = 2, 1
  cfg.data.max_prompt_len, cfg.data.min_bucket = 512, 256
  cfg.sampler.max_new_tokens = 8
  cfg.eval.every_steps, cfg.eval.num_prompts = 0, 2
  cfg.eval.num_generations = 2
  cfg.ckpt.every_steps = 2
  cfg.export.hf_dir = ""
  run = RunConfig.from_dict(cfg.to_dict())
  recs = [
    {
      "id": f"ddx-{i}",
      "question": "Sex: F. Age: 40. Chief complaint: cough. Diagnosis?",
      "answers": [["Bronchitis"], ["Pneumonia"]],
      "context": "",
      "tests": "",
      "meta": {},
      "family": "ddx",
    }
    for i in range(4)
  ]
  out = loop.train(run, str(tmp_path), train_source=recs, eval_source=recs)
  assert out["final"]["step"] == 2
  assert out["after"]["num_prompts"] == 2
  assert (tmp_path / "checkpoints").exists()


def test_completion_bucket():
  assert update.completion_bucket(1, 128) == 16  # the smallest bucket
  assert update.completion_bucket(16, 128) == 16
  assert update.completion_bucket(17, 128) == 32
  assert update.completion_bucket(100, 128) == 128
  assert update.completion_bucket(100, 96) == 96  # never past the cap
  widths = {update.completion_bucket(n, 1536) for n in range(1, 1537)}
  assert widths == {16, 32, 64, 128, 256, 512, 1024, 1536}  # compilations


@pytest.mark.parametrize(
  "agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
)
def test_trimmed_completions_update_exactly(agg, one_device_mesh):
  """The update at the longest completion's width equals the update at
  the sampler's cap (every column cut is masked): the same loss and
  gradients, with per-token advantages and the KL term, for every
  aggregation."""
  rng = np.random.default_rng(7)
  cap, b = 12, 8
  r = _rollout(b=b, n=cap, seed=4)
  lengths = rng.integers(1, 6, b)  # the longest completion: <= 5 tokens
  comp = np.arange(cap)[None] < lengths[:, None]
  r = r.replace(
    tokens=jnp.asarray(rng.integers(3, 64, (b, cap)), jnp.int32),  # pads too
    logprobs=jnp.asarray(-rng.uniform(2, 6, (b, cap)) * comp, jnp.float32),
    mask=jnp.asarray(comp),
    lengths=jnp.asarray(lengths, jnp.int32),
    truncated=jnp.zeros((b,), bool),
  )
  adv = jnp.asarray(rng.normal(size=(b, cap)), jnp.float32)
  ref = jnp.asarray(-rng.uniform(2, 6, (b, cap)), jnp.float32)
  sgd = optax.sgd(1.0)  # new params = params − grad: compares gradients
  ucfg = update.UpdateConfig(
    loss=loss.LossConfig(loss_agg=agg, max_len_norm=cap, kl_beta=0.1),
    micro_batches=2,
    logprob_chunk=4,
  )
  out = []
  for width in (cap, update.completion_bucket(5, cap, minimum=8)):
    m = model.init_model(CFG, one_device_mesh, sharding.TRAIN_RULES, seed=1)
    ro, a = update.trim_completions(r, adv, width)
    batch = update.make_batch(ro, a).replace(ref_logp=ref[:, :width])
    state = update.init_state(m, sgd)
    with sharding.activate(one_device_mesh, sharding.TRAIN_RULES):
      new, metrics = update.update_step(
        nnx.graphdef(m), state, batch, tx=sgd, cfg=ucfg
      )
    out.append(([np.asarray(x) for x in jax.tree.leaves(new.params)], metrics))
  (full, m_full), (cut, m_cut) = out
  assert m_full["tokens"] == m_cut["tokens"] == lengths.sum()
  np.testing.assert_allclose(m_full["loss"], m_cut["loss"], rtol=1e-6)
  np.testing.assert_allclose(m_full["kl_mean"], m_cut["kl_mean"], rtol=1e-6)
  for x, y in zip(full, cut, strict=True):
    np.testing.assert_allclose(x, y, atol=1e-6)
