"""The memory planner (multians_jax/aot/memory.py, tools/memory.py): exact
parameter bytes, sharded per-device figures, KV cache by hand, and the
activation formula against the compiled update step's
``memory_analysis()`` on CPU."""

import dataclasses
import importlib.util
import pathlib
import re
import subprocess
import sys

import ml_collections
import pytest

from multians_jax.aot import memory as mem
from multians_jax.model import support as support_lib
from multians_jax.model import transformer as model_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ROOT / "tests" / "memory_test_config.py"


def _config():
  spec = importlib.util.spec_from_file_location("memory_test_config", CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _qwen8b_config():
  c = _config()
  c.model.path = "Qwen/Qwen3-8B"
  c.model.arch = ml_collections.ConfigDict()
  c.model.param_dtype = c.model.dtype = "bfloat16"
  return c


@pytest.mark.parametrize(
  "dtype, size", [("bfloat16", 2), ("float32", 4)]
)  # fmt: skip
def test_qwen3_8b_param_bytes_are_exact(dtype, size):
  c = _qwen8b_config()
  c.model.param_dtype = dtype
  plan = mem.plan_from_config(c, (1, 16, 1))
  total, _ = mem.estimate(plan)["params"]
  count = model_lib.param_count(plan.model)
  assert count == 8_190_735_360  # Qwen3-8B (untied head)
  assert total == count * size


def test_fsdp_shards_are_one_sixteenth():
  plan = mem.plan_from_config(_qwen8b_config(), (1, 16, 1))
  params = mem.param_shapes(plan.model, plan.mesh)
  for leaf in params["layers"].values():
    per_dev = mem._nbytes(leaf) / mem.shards(leaf.sharding.spec, plan.mesh)
    if leaf.ndim > 2:  # every matrix has 'embed' (4096) on fsdp
      assert per_dev * 16 == mem._nbytes(leaf)
  est = mem.estimate(plan)
  total, dev = est["params"]
  # Only the norms ([L, D], [L, H]) are replicated: within 0.1 % of 1/16.
  assert total / 16 <= dev < total / 16 * 1.001
  o_total, o_dev = est["optimizer state"]
  assert o_total == pytest.approx(2 * total, abs=64)  # mu, nu (+ counters)
  assert o_dev == pytest.approx(2 * dev, abs=64)
  # The same plan on one device: everything whole.
  one = dataclasses.replace(plan, mesh={"data": 1, "fsdp": 1, "tensor": 1})
  assert mem.estimate(one)["params"][1] == total


def test_lora_plan_counts_adapters_for_gradients_and_moments():
  """Qwen3-8B, rank 16 on all seven projections, bf16 base: the adapters
  (by hand: r·(in + out) per projection) are float32 and are all that the
  gradients and moments hold."""
  c = _qwen8b_config()
  c.model.lora_rank = 16
  plan = mem.plan_from_config(c, (1, 1, 1))
  d, kv, f = 4096, 8 * 128, 12288
  per_layer = 16 * (2 * (d + d) + 2 * (d + kv) + 3 * (d + f))
  n_adapters = 36 * per_layer
  assert n_adapters == 43_646_976
  assert model_lib.param_count(plan.model) == 8_190_735_360 + n_adapters
  est = mem.estimate(plan)
  assert est["params"][0] == 8_190_735_360 * 2 + n_adapters * 4
  assert est["optimizer state"][0] == pytest.approx(2 * 4 * n_adapters, abs=64)
  copies = 2 if plan.micro_batches > 1 else 1  # M > 1: + accumulator
  assert est["gradients"][0] == copies * 4 * n_adapters
  c.model.lora_targets = "q_proj,v_proj"
  qv = mem.plan_from_config(c, (1, 1, 1))
  n_qv = 36 * 16 * ((d + d) + (d + kv))
  assert mem.estimate(qv)["gradients"][0] == copies * 4 * n_qv


def test_kv_cache_bytes_by_hand():
  c = _qwen8b_config()
  c.sampler.cache_dtype = "bfloat16"
  plan = mem.plan_from_config(c, (2, 4, 1))
  m = plan.model
  slots = 50 + 64  # data bucket min(16·2^n ≥ 50, max_prompt_len=50) + L
  total = 2 * m.num_layers * 8 * m.num_kv_heads * slots * m.head_dim * 2
  assert mem.kv_cache_bytes(plan) == (total, total / 8)  # batch on data·fsdp
  # The refilling sampler (B = 2 prompts × G = 4 = 8 rows): 4 slot rows of
  # 50 + 64, plus the 2 prefilled prompts of 50.
  c.sampler.slots = 4
  plan = mem.plan_from_config(c, (2, 4, 1))
  per = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 2
  assert (plan.prompts, plan.sample_rows) == (2, 8)
  assert mem.kv_cache_bytes(plan)[0] == per * (4 * slots + 2 * 50)


def test_fused_attention_drops_the_score_arrays():
  """cudnn / splash never hold the [N, S, S] probabilities (float32 +
  compute dtype): a float32 log-sum-exp and max per query and head."""
  c = _qwen8b_config()
  xla = mem.plan_from_config(c, (1, 1, 1))
  c.model.attention = "splash"
  fused = mem.plan_from_config(c, (1, 1, 1))
  assert fused.model.attention == "splash"
  m, b = xla.model, xla.rows // xla.micro_batches
  s = xla.prompt_bucket + xla.new_tokens
  scores = b * m.num_heads * s * (s * (4 + 2) - 8)  # bfloat16 compute
  a, f = mem.activation_bytes(xla), mem.activation_bytes(fused)
  assert a["layer"] - f["layer"] == pytest.approx(scores)  # remat=none
  assert a["working"] - f["working"] == pytest.approx(scores)
  with pytest.raises(ValueError, match="model.attention"):
    c.model.attention = "flash"
    mem.plan_from_config(c, (1, 1, 1))


def test_mesh_fill_and_errors():
  c = _config()
  plan = mem.plan_from_config(c, num_devices=8)
  assert plan.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(ValueError, match="--num_devices"):
    mem.plan_from_config(c)
  with pytest.raises(ValueError, match="do not fill"):
    mem.plan_from_config(c, (3, -1, 1), num_devices=8)
  c.model.path, c.model.arch, c.model.arch_name = "/x", {}, ""
  with pytest.raises(ValueError, match="model.arch_name"):
    mem.plan_from_config(c, (1, 1, 1))


def test_remat_shrinks_activations():
  c = _qwen8b_config()
  c.data.prompts_per_step = 4  # B = 16 rows: one per device
  plan = mem.plan_from_config(c, (1, 16, 1))
  none, full, dots = (
    mem.activation_bytes(plan, r)["layer"] for r in ("none", "full", "dots")
  )
  assert full < dots < none
  # Full remat keeps only the layer input: 1.5·D·bytes per token and device.
  s = plan.prompt_bucket + plan.new_tokens
  assert full == pytest.approx(1 * s * 1.5 * 4096 * 2)
  # 8 rows cannot be cut 16 ways: the batch stays whole on every device.
  c.data.prompts_per_step = 2
  plan8 = mem.plan_from_config(c, (1, 16, 1))
  assert mem.activation_bytes(plan8, "full")["layer"] == pytest.approx(8 * full)


def test_token_budget_sizes_the_largest_micro_batch():
  """rl.micro_batch_tokens: activations of the groups that fit the budget
  with every completion at the cap (the worst case), plus the gradient
  accumulator."""
  c = _qwen8b_config()
  c.data.prompts_per_step = 4
  base = mem.plan_from_config(c, (1, 1, 1))
  t, g, n = base.prompt_bucket, base.generations, base.new_tokens
  c.rl.micro_batch_tokens = 2 * (t + g * n) + 1  # two groups at the cap
  plan = mem.plan_from_config(c, (1, 1, 1))
  assert plan.micro_rows == 2 * g
  assert base.micro_rows == base.rows  # M = 1
  one_group = dataclasses.replace(plan, micro_batch_tokens=1)
  assert one_group.micro_rows == g  # a group runs whole, whatever the budget
  est, est1 = mem.estimate(plan), mem.estimate(base)
  assert est["gradients"][0] == 2 * est1["gradients"][0]
  act = lambda p: mem.activation_bytes(p, "full")["layer"]
  assert act(plan) == pytest.approx(act(base) * 2 * g / base.rows)
  assert "micro_batch_tokens=" in mem.format_report(plan, 95.0)
  # Packed: one row of T + G·L per group at the cap (the prompt once, the
  # attention over all G completions), as many as fit the budget.
  c.rl.pack_completions = True
  packed = mem.plan_from_config(c, (1, 1, 1))
  assert (packed.micro_rows, packed.row_tokens) == (2, t + g * n)
  assert "pack_completions" in mem.format_report(packed, 95.0)
  tokens = 2 * (t + g * n)  # fewer positions than 2G rows of T + L
  assert act(packed) == pytest.approx(act(plan) * tokens / (2 * g * (t + n)))


@pytest.mark.slow
def test_formula_matches_compiled_update_step():
  """Per-layer activations within 10 %, step temporaries within 20 %
  (the tolerances documented in tools/memory.py)."""
  base = mem.plan_from_config(_config(), (1, 1, 1))

  def measured(**kw):
    plan = dataclasses.replace(base, model=base.model.replace(**kw))
    return plan, mem.compiled_memory(plan).temp_size_in_bytes

  p2, t2 = measured(num_layers=2)
  p4, t4 = measured(num_layers=4)
  per_layer = (t4 - t2) / 2
  assert mem.activation_bytes(p4)["layer"] == pytest.approx(per_layer, 0.10)
  for plan, temp in ((p2, t2), (p4, t4)):
    assert mem.update_temps(plan) == pytest.approx(temp, rel=0.20)
  pf, tf = measured(num_layers=4, remat="full")
  assert mem.update_temps(pf) == pytest.approx(tf, rel=0.20)
  assert tf < t4 / 2  # remat is real in the compiled step too
  pl, tl = measured(num_layers=4, lora_rank=8)  # no base-sized gradients
  assert mem.update_temps(pl) == pytest.approx(tl, rel=0.20)
  assert tl < t4


def test_cli_prints_table_and_verdict():
  out = subprocess.run(
    [sys.executable, "tools/memory.py", f"--config={CONFIG}",
     "--num_devices=8", "--config.model.remat=full"],
    capture_output=True, text=True, cwd=ROOT, timeout=120,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr
  text = out.stdout
  assert "mesh data=1, fsdp=8, tensor=1 (8 devices)" in text
  assert "remat=full" in text
  for row in ("params", "optimizer state", "gradients", "kv cache",
              "activations remat=none", "activations remat=full"):  # fmt: skip
    assert row in text
  # 95 GiB from the 'v5p' comment on the config's mesh line.
  assert "verdict: FITS" in text and "of 95 GiB" in text
  plan = mem.plan_from_config(_config(), (1, 8, 1))
  assert f"params={model_lib.param_count(plan.model):,}" in text


def test_cli_plans_a_cpu_config_for_this_host():
  """A config that names no accelerator (the demo's) is planned where it
  runs: the -1 mesh axis takes the local device count, the fit is judged
  against the host's memory, and the report says both."""
  out = subprocess.run(
    [sys.executable, "tools/memory.py", "--config=configs/tiny.py"],
    capture_output=True, text=True, cwd=ROOT, timeout=120,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr
  gb = mem.host_memory_gb()
  assert 0.5 < gb < 1 << 16
  text = out.stdout
  found = re.search(r"planned for this host, (\d+) cpu device\(s\)", text)
  n = int(found.group(1))  # the local devices (XLA_FLAGS may set several)
  assert f"device(s) and {gb:.1f} GiB of memory" in text
  assert f"mesh data=1, fsdp={n}, tensor=1 ({n} devices)" in text
  assert f"per device of {gb:g} GiB" in text


@pytest.mark.slow
def test_truncated_support_head_memory_matches_compiled():
  """top-k / top-p make the update's log-prob chunk hold the support
  mask's sort and sums: the formula's extra bytes equal the compiled
  step's within 10 % (C = 16, V = 8192)."""
  c = _config()
  c.model.arch.vocab_size = 8192
  base = dataclasses.replace(mem.plan_from_config(c, (1, 1, 1)), chunk=16)
  temps = lambda p: mem.compiled_memory(p).temp_size_in_bytes
  full = temps(base)
  for sup in (
    support_lib.Support(top_p=0.8),
    support_lib.Support(top_k=50),
    support_lib.Support(top_k=50, top_p=0.8),
  ):
    plan = dataclasses.replace(base, support=sup)
    measured = temps(plan) - full
    formula = mem.update_temps(plan) - mem.update_temps(base)
    assert measured > 0
    assert formula == pytest.approx(measured, rel=0.1), sup
