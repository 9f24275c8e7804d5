"""tools/bench.py plumbing on a tiny model; decode-path performance invariants.

The benchmark itself is timed by hand (BENCHMARKS.md); here only its JSON
shape and consistency, and the structural properties that make decoding
fast: no cache or weight copies inside the compiled decode loop, and the
two-level categorical draw matching the exact distribution.
"""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multians_jax import sharding
from multians_jax.aot import hlo_cost, profiling
from multians_jax.bench import measure as bench
from multians_jax.model import attention, sampler
from multians_jax.model import transformer as model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(*args) -> None:
  """Runs ``tools/<args>`` from the repository root, as a user does."""
  subprocess.run(
    [sys.executable, *args], cwd=ROOT, check=True, capture_output=True
  )


@pytest.mark.slow
def test_quick_bench_all_on_tiny_model(tmp_path):
  """The harness runs end to end and both sides of each comparison ran
  the same work: the same number of new tokens, the same loss on the two
  update layouts."""
  out_file = tmp_path / "bench.json"
  _tool("tools/bench.py", "all", "--quick", "--model=tiny", f"--out={out_file}")
  out = json.loads(out_file.read_text())
  s = out["sampler"]
  assert s["transformers_new_tokens"] == s["shape"]["new_tokens"]
  assert s["ours_distinct_rows"] > 1  # temperature 0.7: rows differ
  t = out["train"]
  assert math.isfinite(t["ours_mfu"]) and t["ours_mfu"] > 0
  # Shared prompts and the plain layout compute the same loss.
  assert abs(t["loss_shared_minus_plain"]) < 1e-5
  split = t["rl_iteration"]["warm_iteration"]
  assert set(split) == {"sampling_s", "reward_s", "update_s"}
  assert all(v > 0 for v in split.values())
  assert out["reward"]["num"] == 64


@pytest.mark.slow
@pytest.mark.parametrize("case", ["natural", "train", "ckpt"])
def test_fresh_process_ab_harness(tmp_path, case):
  """bench_ab runs every side in its own process, alternating, and
  summarises the repeats; both update layouts compute the same loss."""
  sides = {
    "natural": ["static", "refill_half", "refill_quarter", "transformers"],
    "train": ["ours", "torch", "ours_plain"],
    "ckpt": ["compressed", "uncompressed"],
  }
  out_file = tmp_path / "ab.json"
  _tool(
    "tools/bench_ab.py", case, "--quick", "--repeats=2", f"--out={out_file}"
  )
  out = json.loads(out_file.read_text())
  assert out["order"] == sides[case] and out["repeats"] == 2
  assert len(out["load"]) == 2 * len(out["order"])
  for side in out["sides"].values():
    for m in side.values():
      assert len(m["values"]) == 2 and m["min"] <= m["median"] <= m["max"]
  for c in out["comparisons"]:
    per = c["speedup_per_round"]
    assert per["min"] > 0 and len(per["values"]) == 2
  if case == "natural":
    # Static and refilled rows are the same draws: the same useful tokens.
    tok = {k: v["useful_tokens"]["values"] for k, v in out["sides"].items()}
    assert tok["static"] == tok["refill_half"] == tok["refill_quarter"]
    assert out["sides"]["refill_quarter"]["slots"]["median"] == 2
  elif case == "ckpt":  # both settings save the same state
    saved = {k: v["saved_gb"]["values"] for k, v in out["sides"].items()}
    assert saved["compressed"] == saved["uncompressed"]
    assert saved["compressed"][0] > 0
    for v in out["sides"].values():
      assert v["save_total_s"]["min"] >= v["save_call_s"]["min"] > 0
  else:
    loss = out["sides"]["ours"]["loss"]["values"]
    np.testing.assert_allclose(
      loss, out["sides"]["ours_plain"]["loss"]["values"], atol=1e-5
    )


@pytest.mark.slow
def test_rl_case_runs_our_step_and_names_a_missing_trl(tmp_path):
  """``bench_ab.py rl`` (our sides; TRL is a benchmark-only dependency):
  a full step ran on the natural and the forced lengths, the update in
  token-budget micro-batches at the longest completion's width; a TRL
  side whose interpreter lacks trl stops with the fix named."""
  out_file = tmp_path / "rl.json"
  _tool("tools/bench_ab.py", "rl", "--quick", "--repeats=1",
        "--sides=ours,ours_forced", f"--out={out_file}")  # fmt: skip
  out = json.loads(out_file.read_text())
  assert out["order"] == ["ours", "ours_forced"] and not out["comparisons"]
  for name, side in out["sides"].items():
    med = {k: v["median"] for k, v in side.items()}
    assert med["step_s"] >= med["sample_s"] > 0 and med["update_s"] > 0
    assert med["update_width"] >= med["max_length"] > 0
    cap = out["shape"]["new_tokens" if "forced" in name else "natural_new"]
    assert med["max_length"] <= cap and med["micro_batches"] >= 1
    # the update alone on the same rollout: packed, at uniform length, and
    # in equal micro-batches (the update before the token budget)
    for k in ("update_only_s", "uniform_update_s", "packed_update_s",
              "packed_uniform_update_s", "equal_split_update_s"):  # fmt: skip
      assert med[k] > 0
    assert med["decoder_positions"] > 0 and med["packed_positions"] > 0
  assert out["sides"]["ours_forced"]["mean_length"]["median"] == 8  # forced
  blocked = (
    "import runpy, sys; sys.modules['trl'] = None; "
    "sys.argv = ['bench_ab.py'] + sys.argv[1:]; "
    "runpy.run_path('tools/bench_ab.py', run_name='__main__')"
  )
  work = tmp_path / "work"
  work.mkdir()
  _tool("tools/bench_ab.py", "prepare", str(work), "rl", "--quick")
  proc = subprocess.run(
    [sys.executable, "-c", blocked, "side", "rl", "trl", str(work),
     str(work / "hf"), "--quick"],
    cwd=ROOT, capture_output=True, text=True,
  )  # fmt: skip
  assert proc.returncode != 0
  assert "the TRL side cannot import" in proc.stderr
  assert "--reference-python" in proc.stderr


def test_flop_formulas():
  cfg = model.named_arch("smollm2_135m")
  # Tied embeddings: the 49152×576 table counts once (as the LM head).
  assert bench.matmul_params(cfg) == model.param_count(cfg)
  untied = cfg.replace(tie_embeddings=False)
  assert bench.matmul_params(untied) == model.param_count(cfg)
  n = bench.matmul_params(cfg)
  # 1 row, 1 step over S = 3 slots: 2N + 4·layers·heads·head_dim·S.
  assert bench.decode_flops(cfg, 1, 2, 1) == 2 * n + 4 * 30 * 9 * 64 * 3


def _while_bodies(hlo: str) -> dict[str, str]:
  return {f"%{k}": "\n".join(v) for k, v in hlo_cost.computations(hlo).items()}


def decode_loops(m, scfg, p: int, t: int, g: int, rows: int):
  """The compiled sampler's decode loops: for each while loop whose carry
  holds per-layer [rows, K, T + L, H] caches, its body and the texts of the
  computations it calls. Also returns the shape strings of a layer's value
  and key buffers (the keys [rows, K, H, T + L] in the ``hs`` layout)."""
  cfg = m.cfg
  ids = np.ones((p, t), np.int32)
  hlo = profiling.compiled_sampler(m, ids, ids > 0, scfg, g)[0].as_text()
  comps = _while_bodies(hlo)
  slots = t + scfg.max_new_tokens
  layer_cache = f"f32[{rows},{cfg.num_kv_heads},{slots},{cfg.head_dim}]"
  layer_keys = layer_cache
  if attention.decode_key_layout(cfg.attention) == "hs":
    layer_keys = f"f32[{rows},{cfg.num_kv_heads},{cfg.head_dim},{slots}]"
  loops = [
    re.search(r"body=(%[^,\s]+)", ln).group(1)
    for ln in hlo.splitlines()
    if " while(" in ln and layer_cache in ln and layer_keys in ln
  ]
  assert loops, "no decode while loop over per-layer caches found"
  out = []
  for name in loops:
    body = comps[name]
    called = re.findall(r"(?:calls|body|condition|to_apply)=(%[^,\s)]+)", body)
    out.append((body, [comps.get(c, "") for c in called]))
  return (layer_cache, layer_keys), out


def assert_no_big_copies(texts, big):
  """No copy / slice / transpose of an array whose shape starts with one
  of ``big`` (the cache, weight matrices) in the HLO ``texts``."""
  for text in texts:
    for ln in text.splitlines():
      op = re.search(r"= (\S+) (copy|dynamic-slice|slice|transpose)\(", ln)
      if op:
        assert not any(op.group(1).startswith(b) for b in big), ln


def test_decode_loop_copies_neither_cache_nor_weights(one_device_mesh):
  cfg = bench.TINY.replace(num_layers=3, vocab_size=1000)
  m = model.init_model(cfg, one_device_mesh, sharding.TRAIN_RULES)
  p, t, g, steps = 2, 16, 3, 8
  scfg = sampler.SamplingConfig(steps, temperature=0.7)
  # The decode loop: the while whose carry holds the per-layer caches.
  caches, loops = decode_loops(m, scfg, p, t, g, p * g)
  body, called = loops[0]
  big = (*caches, f"f32[{cfg.d_model},{cfg.d_ff}]",
         f"f32[{cfg.d_ff},{cfg.d_model}]")  # fmt: skip
  assert_no_big_copies([body, *called], big)
  # In-place: one dynamic-update-slice of one slot per layer and k/v.
  dus = re.findall(r"dynamic-update-slice\(", "\n".join([body, *called]))
  assert len(dus) >= 2 * cfg.num_layers


def test_decode_profile_times_each_op_group(one_device_mesh):
  """``bench.py profile`` (``profiling``): every matmul of the decode
  loop lands in its group (one score and one value dot per layer, the LM
  head once), and the trace gives each group time; the shares add up to
  1."""
  cfg = bench.TINY.replace(num_layers=3, vocab_size=1000)
  m = model.init_model(cfg, one_device_mesh, sharding.TRAIN_RULES)
  ids = np.ones((2, 16), np.int32)
  scfg = sampler.SamplingConfig(5, temperature=0.7, min_prompt_bucket=0)
  hlo = profiling.compiled_sampler(m, ids, ids > 0, scfg, 2)[0].as_text()
  groups = profiling.decode_op_groups(hlo, cfg, 21)
  count = lambda g: sum(v == g for v in groups.values())
  assert count("scores") == count("values") == cfg.num_layers
  assert count("lm_head") == 1
  assert count("projections") >= 4 * cfg.num_layers  # qkv / o / MLP
  out = profiling.profile_decode(m, ids, 2, steps=4)
  assert out["slots"] == 21 and out["events"] > 0
  assert all(out["ms_per_step"][g] > 0 for g in profiling.OP_GROUPS)
  assert abs(sum(out["share"].values()) - 1) < 1e-9


@pytest.mark.parametrize("block", [4, 256])
def test_two_level_categorical_is_exact(block):
  probs = np.array([0.3, 0.0, 0.25, 0.15, 1e-9, 0.2, 0.0, 0.1, 0.0])
  with np.errstate(divide="ignore"):
    logits = jnp.asarray(np.log(probs), "float32")  # -inf: impossible
  n = 60000
  keys = jax.random.split(jax.random.key(7), n)
  draw = jax.jit(
    jax.vmap(
      lambda k: sampler._categorical(
        jax.random.uniform(k, (1, 1)), logits[None], block
      )[0]
    )
  )(keys)
  f = np.bincount(np.asarray(draw), minlength=9) / n
  q = np.asarray(jax.nn.softmax(logits))
  assert (f[q == 0] == 0).all()  # never a zero-probability token
  assert np.all(np.abs(f - q) <= 5 * np.sqrt(q * (1 - q) / n) + 1e-9)
