"""Where a decode step's time goes, op by op: the compiled sampler's HLO
classifies every instruction of its decode loop (``OP_GROUPS``) and a
``jax.profiler`` trace of one call times them (``tools/bench.py
profile``)."""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import tempfile

import jax
import numpy as np
from flax import nnx

from multians_jax.aot import hlo_cost
from multians_jax.model import sampler

OP_GROUPS = {
  "projections": "q/k/v, output and MLP projections",
  "lm_head": "LM head [B, D] x [D, V]",
  "scores": "attention scores q·kᵀ",
  "values": "attention p·v",
  "other": "everything else (norms, RoPE, softmax, sampling, cache writes)",
}


def decode_op_groups(hlo: str, cfg, slots: int) -> dict[str, str]:
  """Instruction name → ``OP_GROUPS`` key, for every instruction run by the
  decode loop (the ``while`` whose body is the largest computation and the
  computations it calls). A dot, or a fusion around one, is classified by
  the dot's output: [..., V] the LM head, [B, K, G, S] the scores, [B, K,
  G, H] the values, any other the projections."""
  comps = hlo_cost.computations(hlo)

  def called(lines):
    return [
      c
      for ln in lines
      for c in re.findall(r"(?:calls|body|to_apply)=%([^,\s)]+)", ln)
    ]

  def dot_of(lines):
    for ln in lines:
      i = hlo_cost.parse_inst(ln)
      if i and i.opcode == "dot":
        return hlo_cost.shape_of(i.type)
    return None

  def group(shape):
    if shape[-1] == cfg.vocab_size:
      return "lm_head"
    if len(shape) == 4 and shape[-1] == slots:
      return "scores"
    if len(shape) == 4 and shape[-1] == cfg.head_dim:
      return "values"
    return "projections"

  bodies = [b for c in comps.values() for ln in c if " while(" in ln
            for b in re.findall(r"body=%([^,\s)]+)", ln)]  # fmt: skip
  if not bodies:
    raise ValueError("no while loop in the compiled sampler")
  todo, seen = [max(bodies, key=lambda b: len(comps[b]))], set()
  groups = {}
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for ln in comps[name]:
      i = hlo_cost.parse_inst(ln)
      if not i:
        continue
      inst, op = i.name, i.opcode
      dot = hlo_cost.shape_of(i.type) if op == "dot" else None
      if op == "fusion":
        inner = [c for c in called([ln]) if c in comps]
        dot = next((d for c in inner if (d := dot_of(comps[c]))), None)
      groups[inst] = group(dot) if dot else "other"
      if op != "fusion":
        todo.extend(called([ln]))
  return groups


def _trace_events(log_dir: str) -> list[dict]:
  paths = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"),
                    recursive=True)  # fmt: skip
  if not paths:
    raise RuntimeError(f"jax.profiler wrote no trace under {log_dir}")
  with gzip.open(paths[0], "rt") as f:
    return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def compiled_sampler(model, ids, mask, scfg, g: int, seed: int = 0):
  """``sampler._sample`` compiled for these prompts (left-padded to no
  bucket: ``scfg.min_prompt_bucket`` 0) and a call of that very
  executable: its HLO text (``.as_text()``) names the ops a trace of the
  call shows."""
  graphdef, state = nnx.split(model)
  key = jax.random.key(seed)
  compiled = sampler._sample.lower(
    graphdef, state, ids, mask, key, cfg=scfg, num_samples=g
  ).compile()
  return compiled, lambda: compiled(state, ids, mask, key).tokens


def profile_decode(model, ids, g: int, steps: int = 32) -> dict:
  """Per-op times of the static sampler's decode loop from a
  ``jax.profiler`` trace (``steps`` decode steps for the prompts ``ids``
  [P, T] × ``g``), grouped by ``OP_GROUPS``: ms per step and share of the
  loop's op time."""
  cfg = model.cfg
  p, t = ids.shape
  mask = np.ones(ids.shape, bool)
  scfg = sampler.SamplingConfig(
    max_new_tokens=steps + 1, temperature=0.7, min_prompt_bucket=0
  )
  compiled, run = compiled_sampler(model, ids, mask, scfg, g)
  jax.block_until_ready(run())  # warm-up outside the trace
  hlo = compiled.as_text()
  groups = decode_op_groups(hlo, cfg, t + steps + 1)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      jax.block_until_ready(run())
    events = _trace_events(d)
  us = dict.fromkeys(OP_GROUPS, 0.0)
  matched = 0
  for e in events:
    name = e["name"].lstrip("%")
    if name in groups:
      us[groups[name]] += e["dur"]
      matched += 1
  total = sum(us.values())
  if not matched:
    raise RuntimeError("no trace event matched a decode-loop instruction")
  return dict(
    rows=p * g, slots=t + steps + 1, steps=steps, events=matched,
    op_ms_per_step=total / 1e3 / steps,
    ms_per_step={k: v / 1e3 / steps for k, v in us.items()},
    share={k: v / total for k, v in us.items()},
    groups=OP_GROUPS,
  )  # fmt: skip
