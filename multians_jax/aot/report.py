"""The reports of ``aot``: per-stage memory, cost and fit from a compiled
executable, the step's roofline estimate, the printed table."""

from __future__ import annotations

import re

from multians_jax.aot import hlo_cost, memory

GiB = memory.GiB


def failure(name: str, e: Exception, chip, seconds: float) -> dict:
  """The report of a stage the compiler rejected: over the chip's HBM
  (the compiler's RESOURCE_EXHAUSTED, with the bytes and the setting to
  change), or any other error, its message kept whole."""
  oom = _out_of_memory(str(e))
  if oom is None:
    return dict(
      error=f"{type(e).__name__}: {e}", fits=False, compile_seconds=seconds
    )
  need, have = oom
  return dict(
    fits=False,
    out_of_memory=str(e).strip().splitlines()[0][:500],
    temp_bytes=need,
    compiler_hbm_bytes=have,
    compile_seconds=seconds,
    advice=f"{name} needs {need / GiB:.2f} GiB of temporaries per chip, "
    f"{(need - have) / GiB:.2f} GiB over the {have / GiB:.2f} GiB the "
    f"compiler allows on a {chip.name}: " + _advice(name),
  )


def prefill_part(rep: dict, chip) -> dict:
  """The sampler executable's cost outside its decode loop (prefill, the
  cache repeat), with the whole sampler's memory."""
  f, b = rep.pop("outside_loop")
  pre = {k: v for k, v in rep.items() if not k.startswith("step_")}
  pre.pop("advice", None)
  pre.update(
    flops_per_chip=f,
    bytes_accessed_per_chip=b,
    note="the sampler executable outside its decode loop (prefill, cache "
    "repeat); memory is the whole sampler's",
    **_roofline(f, b, chip),
  )
  return pre


def _out_of_memory(msg: str):
  """(bytes needed, bytes available) from the TPU compiler's refusal of a
  program over the chip's HBM, else None."""
  m = re.search(
    r"RESOURCE_EXHAUSTED.*?\(([\d.]+)([KMGT])\) exceeds available HBM "
    r"\(([\d.]+)([KMGT])\)", msg, re.DOTALL,
  )  # fmt: skip
  if not m:
    return None
  unit = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
  return (
    int(float(m.group(1)) * unit[m.group(2)]),
    int(float(m.group(3)) * unit[m.group(4)]),
  )


def _advice(name: str) -> str:
  return {
    "prefill": "lower rl.sample_chunk (prompts per sampler call)",
    "decode": "lower rl.sample_chunk or sampler.slots, or use "
    "sampler.cache_dtype=bfloat16",
    "update": "raise rl.micro_batches, set model.remat=full, or train LoRA "
    "adapters (model.lora_rank)",
    "logprobs": "raise rl.micro_batches or lower rl.logprob_chunk",
    "warmup": "lower warmup.batch_prompts",
  }.get(name, "use a larger slice")


def _memory(compiled, resident: float) -> dict:
  """The compiler's per-chip memory; the peak adds what stays resident in
  HBM outside the stage's arguments."""
  ma = compiled.memory_analysis()
  out = dict(
    argument_bytes=int(ma.argument_size_in_bytes),
    output_bytes=int(ma.output_size_in_bytes),
    alias_bytes=int(ma.alias_size_in_bytes),
    temp_bytes=int(ma.temp_size_in_bytes),
    code_bytes=int(ma.generated_code_size_in_bytes),
  )
  peak = (
    out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
    + out["temp_bytes"] + out["code_bytes"]
  )  # fmt: skip
  out.update(
    compiled_peak_bytes_per_chip=peak,
    resident_bytes_per_chip=int(resident),
    peak_bytes_per_chip=peak + int(resident),
  )
  return out


def _roofline(flops: float, nbytes: float, chip) -> dict:
  t_flops, t_bytes = flops / chip.bf16_flops, nbytes / chip.hbm_bandwidth
  return dict(
    roofline_seconds=max(t_flops, t_bytes),
    bound="compute" if t_flops >= t_bytes else "memory",
  )


def report_stage(name, stage, compiled, chip, seconds: float):
  """One stage's report: memory, trip-count-weighted cost (the decode
  loop's alone for the sampler: the program at its bound minus the program
  with the loop run zero times; the rest is kept for ``prefill_part``),
  XLA's own loop-once counts, roofline, fit."""
  out = _memory(compiled, stage.resident)
  prog = hlo_cost.Program(compiled.as_text())
  cost = prog.cost(bounds={"": stage.bound})
  flops, nbytes = cost.flops, cost.bytes_accessed
  if stage.loop_only:
    rest = prog.cost(bounds={"": 0})
    out["outside_loop"] = (rest.flops, rest.bytes_accessed)
    flops, nbytes = flops - rest.flops, nbytes - rest.bytes_accessed
    out["step_flops_per_chip"] = flops / stage.bound
    out["step_bytes_per_chip"] = nbytes / stage.bound
  xla = compiled.cost_analysis() or {}
  if isinstance(xla, list):  # older jax: one dict per program
    xla = xla[0] if xla else {}
  total = out["peak_bytes_per_chip"]
  out.update(
    flops_per_chip=flops,
    bytes_accessed_per_chip=nbytes,
    xla_flops_per_chip=float(xla.get("flops", 0.0)),
    xla_bytes_accessed_per_chip=float(xla.get("bytes accessed", 0.0)),
    loops=[[b, n, how] for b, n, how in cost.loops],
    custom_calls=cost.custom_calls,
    mosaic_calls=cost.mosaic_calls,
    mosaic_kernels=cost.mosaic_kernels,
    library_calls=cost.library_calls,
    calls_per_step=stage.calls_per_step,
    compile_seconds=seconds,
    fits=total <= chip.budget_bytes,
    **_roofline(flops, nbytes, chip),
  )
  if stage.note:
    out["note"] = stage.note
  if not out["fits"]:
    over = total - chip.budget_bytes
    out["advice"] = (
      f"{name} needs {total / GiB:.2f} GiB per chip, {over / GiB:.2f} GiB "
      f"over the {chip.budget_bytes / GiB:.1f} GiB {_budget(chip)}: "
      + _advice(name)
    )
  return out


def _budget(chip) -> str:
  if chip.usable == 1.0:
    return f"of a {chip.name}"
  return (
    f"JAX allocates on a {chip.name} ({chip.usable:.0%} of "
    f"{chip.hbm_bytes / GiB:.1f} GiB: XLA_PYTHON_CLIENT_MEM_FRACTION)"
  )


def planner_peaks(run, mesh_sizes: dict) -> dict:
  """tools/memory.py's per-device peaks (sampling, update) for the same
  config and mesh, in bytes."""
  plan = memory.plan_from_config(run, tuple(mesh_sizes.values()))
  return memory.peaks(plan, memory.estimate(plan))


def step_estimate(res: dict, run) -> dict:
  """Roofline time of one RL step from its stages (sampling: prefill and
  decode per sampler call; the update ``rl.num_iterations`` times), the
  tokens it generates at the cap, and the update's compiled FLOPs against
  the model's 6·N·tokens."""
  st = res["stages"]
  sh = res["shapes"]
  ok = lambda n: (
    n in st and "error" not in st[n] and "out_of_memory" not in st[n]
  )
  if not all(ok(n) for n in ("prefill", "decode", "update")):
    return {}  # no estimate of a step that does not compile whole
  seconds = lambda n: st[n]["roofline_seconds"] * st[n]["calls_per_step"]
  sample = seconds("prefill") + seconds("decode")
  upd = seconds("update") + (seconds("logprobs") if ok("logprobs") else 0.0)
  b = sh["prompts"] * sh["g"]
  gen = b * sh["l"]
  chips = res["chips"]
  out = dict(
    sample_seconds=sample,
    update_seconds=upd,
    step_seconds=sample + upd,
    generated_tokens=gen,
    tokens_per_second_per_chip=gen / max(sample + upd, 1e-12) / chips,
  )
  shared = run.rl.share_prompt and sh["g"] > 1
  trained = (sh["prompts"] * sh["t"] if shared else b * sh["t"]) + b * sh["l"]
  # 6 FLOPs per parameter per trained token (forward 2, backward 4) for the
  # decoder layers, and for the LM head on completion tokens only (the
  # update computes no logits at prompt positions); the embedding lookup is
  # no matmul. Remat, attention and the head's chunking make the compiled
  # count larger.
  head = res["vocab"] * res["d_model"]
  body = res["params"] - head * (1 if res["tied"] else 2)
  model = 6.0 * (body * trained + head * b * sh["l"]) / chips
  out["update_model_flops_per_chip"] = model
  out["update_compiled_over_model_flops"] = (
    st["update"]["flops_per_chip"] / model
  )
  # decoding: 2 FLOPs per parameter per row and step
  model = 2.0 * res["params"] * sh["chunk"] * sh["g"] / chips
  out["decode_step_model_flops_per_chip"] = model
  out["decode_step_compiled_over_model_flops"] = (
    st["decode"]["step_flops_per_chip"] / model
  )
  return out


def _header(res: dict) -> str:
  return (
    f"{res['topology']}: {res['chips']} {res['chip']} chips, {res['hosts']} "
    f"host(s), {res['hbm_bytes_per_chip'] / GiB:.0f} GiB HBM per chip"
    + (
      f" ({res['hbm_budget_bytes_per_chip'] / GiB:.1f} GiB for JAX)"
      if res.get("hbm_budget_bytes_per_chip", res["hbm_bytes_per_chip"])
      != res["hbm_bytes_per_chip"]
      else ""
    )
    + "; mesh "
    + ", ".join(f"{k}={v}" for k, v in res["mesh"].items())
    + f"; attention={res['attention']}; {res['params'] / 1e9:.2f} B params"
  )


def format_table(res: dict) -> str:
  g = lambda x: f"{x / GiB:8.2f}"
  lines = [
    _header(res),
    "",
    f"{'stage':<9} {'peak GiB':>8} {'args':>8} {'temp':>8} {'resid.':>8} "
    f"{'planner':>8} {'TFLOP':>9} {'GB acc.':>9} {'roofline s':>10}  verdict",
  ]
  for name, s in res["stages"].items():
    if "error" in s:
      lines.append(f"{name:<9} FAILED TO COMPILE: {s['error'][:400]}")
      continue
    if "out_of_memory" in s:
      lines.append(
        f"{name:<9} {'>' + format(s['temp_bytes'] / GiB, '.2f'):>8} "
        "(the compiler ran out of HBM)  DOES NOT FIT"
      )
      continue
    lines.append(
      f"{name:<9} {g(s['peak_bytes_per_chip'])} {g(s['argument_bytes'])} "
      f"{g(s['temp_bytes'])} {g(s['resident_bytes_per_chip'])} "
      f"{g(s['planner_peak_bytes_per_chip'])} "
      f"{s['flops_per_chip'] / 1e12:9.2f} "
      f"{s['bytes_accessed_per_chip'] / 1e9:9.2f} "
      f"{s['roofline_seconds']:10.3f}  "
      + ("fits" if s["fits"] else "DOES NOT FIT")
    )
  for s in res["stages"].values():
    if "advice" in s:
      lines.append("  " + s["advice"])
  st = res["step"]
  failed = [n for n, s in res["stages"].items() if "error" in s]
  if failed:
    lines.append(f"\nverdict: FAILED TO COMPILE: {', '.join(failed)}")
    return "\n".join(lines)
  if not st:
    lines.append("\n(no step estimate: not every stage was compiled)")
    lines.append("verdict: " + ("FITS" if res["fits"] else "DOES NOT FIT"))
    return "\n".join(lines)
  lines += [
    "",
    f"step at roofline: sampling {st['sample_seconds']:.2f} s + update "
    f"{st['update_seconds']:.2f} s = {st['step_seconds']:.2f} s; "
    f"{st['tokens_per_second_per_chip']:.0f} generated tokens/s/chip "
    "(compiled estimate, not a measurement)",
  ]
  if "update_compiled_over_model_flops" in st:
    lines.append(
      f"update FLOPs {st['update_compiled_over_model_flops']:.2f}x the "
      "model's 6·N·tokens"
    )
  lines.append("verdict: " + ("FITS" if res["fits"] else "DOES NOT FIT"))
  return "\n".join(lines)
