"""Fresh-process A/B benchmarks: ours against transformers / torch (JSON).

Run: ``python tools/bench_ab.py {sampler,natural,train} [--repeats=3]
[--out=FILE.json] [--quick]``.

Every measurement runs in its own fresh Python process (``side``), so no
side inherits the other's threads, heap or compilation caches; the sides
alternate A, B, A, B, ... for ``--repeats`` rounds on the same weights
(one Hugging Face directory that both load) and the same inputs. Each side
warms up inside its own process before it is timed. Reported per side and
metric: the median, min and max over the repeats, and every value; per
comparison, the ratio of the medians and the min–max of the per-round
ratios; the 1-minute load average before every process.

Cases (shape letters as in ``tools/bench.py``):

* ``sampler``: the forced-length shape (P=8 × G=8, T=128 random prompt
  tokens, L=128 new tokens, no stop token, temperature 0.7). Completion
  tokens/s, the time of prefill + 1 step, and the decode step (the
  difference over L − 1 steps) of ``sampler.sample`` and of ``generate``.
* ``natural``: real chat prompts (8 questions of the built-in ``countries``
  dataset in the ``multi_rlcr`` format, chat template, left-padded) × G=8,
  up to L=256 tokens, stopping at EOS. Useful tokens/s = completion tokens
  up to and including EOS per second, for ``sampler.sample`` with one slot
  per row (``static``), with ``sampler.slots`` = B/2 and B/4 = 32 and 16
  (``refill_half``, ``refill_quarter``: rows that stop hand their slot to
  the next), and for
  ``generate`` (which stops when every row has).
* ``train``: ``update.update_step`` at B×S = 64×256, 4 micro-batches, with
  shared prompts (the default) and in the plain per-row layout, against a
  transformers forward + backward + AdamW step (``bench.py``'s).

``--quick`` runs the tiny random model at tiny shapes (the smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SIDES = {
  "sampler": ("ours", "transformers"),
  "natural": ("static", "refill_half", "refill_quarter", "transformers"),
  "train": ("ours", "torch", "ours_plain"),
}
COMPARE = {  # (case, metric, ours side, reference side, bigger is better)
  "sampler": [
    ("tokens_per_s", "ours", "transformers", True),
    ("decode_ms_per_step", "ours", "transformers", False),
    ("prefill_plus_1_step_s", "ours", "transformers", False),
  ],
  "natural": [
    ("useful_tokens_per_s", "static", "transformers", True),
    ("useful_tokens_per_s", "refill_half", "transformers", True),
    ("useful_tokens_per_s", "refill_half", "static", True),
    ("useful_tokens_per_s", "refill_quarter", "static", True),
  ],
  "train": [
    ("step_s", "ours", "torch", False),
    ("step_s", "ours_plain", "torch", False),
  ],
}
SHAPES = {
  False: dict(prompts=8, group=8, prompt_len=128, new_tokens=128,
              natural_new=256, batch=64, seq=256, micro=4),
  True: dict(prompts=2, group=4, prompt_len=16, new_tokens=8,
             natural_new=24, batch=8, seq=32, micro=2),
}  # fmt: skip


# ---------------------------------------------------------------------------
# One side, in its own process


def _ours(hf_dir):
  import jax

  from multians_jax import sharding, sources
  from multians_jax.bench import measure as bench

  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  model, _, _ = sources.load_model(hf_dir, mesh, sharding.TRAIN_RULES)
  return model, bench


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def side_sampler(impl, hf_dir, inputs, sh):
  ids, g, new = inputs["ids"], sh["group"], sh["new_tokens"]
  if impl == "ours":
    model, bench = _ours(hf_dir)
    t = bench.time_ours(model, ids, g, new, 0.7)
    full, one = t[new]["warm"], t[1]["warm"]
    b, steps = ids.shape[0] * g, max(new - 1, 1)
    flops = bench.decode_flops(model.cfg, b, ids.shape[1], steps)
    peak = bench.matmul_peak(1024 if sh["new_tokens"] < 64 else 2048)
    out = {
      "compile_and_first_call_s": t[new]["first"],
      "matmul_peak_flop_per_s": peak,
      "decode_fraction_of_peak": flops / max(full - one, 1e-9) / peak,
    }
  else:
    from multians_jax.bench import torch_ref as bench_torch  # no JAX here

    full, _ = bench_torch.time_transformers(hf_dir, ids, g, new, 0.7)
    one, _ = bench_torch.time_transformers(hf_dir, ids, g, 1, 0.7)
    out = {}
  out.update(
    tokens_per_s=ids.shape[0] * g * new / full,
    full_s=full,
    prefill_plus_1_step_s=one,
    decode_ms_per_step=1e3 * (full - one) / max(new - 1, 1),
  )
  return out


def side_natural(impl, hf_dir, inputs, sh):
  ids, mask = inputs["nat_ids"], inputs["nat_mask"]
  stops = tuple(int(s) for s in inputs["stop_ids"])
  pad, g, new = int(inputs["pad_id"]), sh["group"], sh["natural_new"]
  if impl == "transformers":
    lengths, dt = _generate_natural(hf_dir, ids, mask, g, new, stops, pad)
    slots = 0
  else:
    lengths, dt, slots = _sample_natural(
      impl, hf_dir, ids, mask, g, new, stops, pad
    )
  return dict(
    slots=slots,
    useful_tokens_per_s=float(lengths.sum() / dt),
    seconds=dt,
    useful_tokens=int(lengths.sum()),
    mean_length=float(lengths.mean()),
    max_length=int(lengths.max()),
    hit_limit=int((lengths == new).sum()),
  )


def _sample_natural(impl, hf_dir, ids, mask, g, new, stops, pad):
  import jax

  from multians_jax.model import sampler

  model, _ = _ours(hf_dir)
  b = ids.shape[0] * g
  slots = {"static": 0, "refill_half": b // 2, "refill_quarter": b // 4}[impl]
  cfg = sampler.SamplingConfig(
    max_new_tokens=new, temperature=0.7, stop_ids=stops, pad_id=pad,
    min_prompt_bucket=0, slots=slots,
  )  # fmt: skip
  run = lambda k: sampler.sample(model, ids, mask, jax.random.key(k), cfg, g)
  jax.block_until_ready(run(1))  # compile + warm-up
  dt, r = _timed(lambda: jax.block_until_ready(run(0)))
  return np.asarray(r.lengths), dt, slots


def _generate_natural(hf_dir, ids, mask, g, new, stops, pad):
  import torch

  from multians_jax.bench import torch_ref as bench_torch  # no JAX here

  ref = bench_torch.load(hf_dir)
  rows = torch.tensor(np.repeat(ids, g, 0), dtype=torch.long)
  att = torch.tensor(np.repeat(mask, g, 0), dtype=torch.long)
  kw = dict(attention_mask=att, do_sample=True, temperature=0.7, top_k=0,
            top_p=1.0, eos_token_id=list(stops), pad_token_id=pad)  # fmt: skip
  with torch.inference_mode():
    ref.generate(rows, max_new_tokens=2, **kw)  # warm-up
    torch.manual_seed(0)
    dt, out = _timed(lambda: ref.generate(rows, max_new_tokens=new, **kw))
  comp = out[:, rows.shape[1] :].numpy()
  is_stop = np.isin(comp, stops)
  first = np.where(is_stop.any(1), is_stop.argmax(1) + 1, comp.shape[1])
  return first, dt


def side_train(impl, hf_dir, inputs, sh):
  if impl == "torch":
    from multians_jax.bench import torch_ref as bench_torch  # no JAX here

    arrays = {k: inputs[f"train_{k}"] for k in bench_torch.TORCH_INPUTS}
    comp = sh["seq"] // 2
    return dict(
      step_s=bench_torch.torch_update(hf_dir, arrays, sh["micro"], comp)
    )
  import jax.numpy as jnp

  from multians_jax.rl import update

  model, bench = _ours(hf_dir)
  n = sh["seq"] // 2
  roll = bench._rollout(model.cfg, sh["batch"], n, n, group=sh["group"])
  batch = update.make_batch(roll, jnp.asarray(inputs["train_adv"]))
  group = 1 if impl == "ours_plain" else sh["group"]
  t = bench.time_update(model, batch, sh["micro"], group)
  return dict(
    step_s=t["warm"], compile_and_first_step_s=t["first"], loss=t["loss"]
  )


SIDE_FNS = {"sampler": side_sampler, "natural": side_natural,
            "train": side_train}  # fmt: skip


# ---------------------------------------------------------------------------
# Inputs shared by every side


def prepare(workdir: str, quick: bool) -> dict:
  """The HF directory both sides load, and the inputs (``inputs.npz``)."""
  import jax

  from multians_jax import config
  from multians_jax.bench import measure as bench
  from multians_jax.data import pipeline as data
  from multians_jax.data.datasets import base, countries
  from multians_jax.interop import hf
  from multians_jax.rl import update

  sh = SHAPES[quick]
  model, tok = bench.load("tiny" if quick else "smollm2")
  # SmolLM2 ships as GGUF: both sides load this exported fp32 directory.
  hf_dir = os.path.join(workdir, "hf")
  hf.save(model, hf_dir, tokenizer=tok)
  cfg, p = model.cfg, sh["prompts"]
  if tok is None:  # the tiny model: random "chat" prompts of ragged length
    rng = np.random.default_rng(3)
    rows = [list(rng.integers(3, cfg.vocab_size, n)) for n in (5, 9)[:p]]
  else:
    pkg = base.package_dir("countryinfo", "countryinfo", "countries")
    recs = countries.records_from(os.path.join(pkg, "data"))
    recs = sorted(recs, key=lambda r: r["id"])[:: max(1, len(recs) // p)][:p]
    pcfg = data.PipelineConfig(p, "multi_rlcr", 3, 1024)
    rows = [data.render(r, tok, pcfg) for r in recs]
  stop_ids, pad_id = config.stop_and_pad(cfg, tok)  # as a run decides them
  width = max(map(len, rows))
  nat_ids, nat_mask, _ = data.left_pad_rows(rows, width, pad_id)
  n = sh["seq"] // 2
  roll = bench._rollout(cfg, sh["batch"], n, n, group=sh["group"])
  adv = np.random.default_rng(1).standard_normal(sh["batch"]).astype("f4")
  batch = update.make_batch(roll, jax.numpy.asarray(adv))
  arrays = dict(
    ids=bench._prompts(cfg, p, sh["prompt_len"]),
    nat_ids=np.asarray(nat_ids, np.int32),
    nat_mask=np.asarray(nat_mask, bool),
    stop_ids=np.asarray(stop_ids, np.int32),
    pad_id=np.asarray(pad_id),
    **{f"train_{k}": np.asarray(getattr(batch, k))
       for k in bench.TORCH_INPUTS},
  )  # fmt: skip
  np.savez(os.path.join(workdir, "inputs.npz"), **arrays)
  return dict(hf_dir=hf_dir, prompt_lengths=[len(r) for r in rows])


# ---------------------------------------------------------------------------
# The driver


def _child(args: list[str]) -> dict:
  path = [HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
  with tempfile.NamedTemporaryFile(suffix=".json") as f:
    cmd = [sys.executable, os.path.abspath(__file__), *args, f"--out={f.name}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(
        f"benchmark process {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
      )
    return json.loads(open(f.name).read())


def _summary(values: list[float]) -> dict:
  return dict(median=statistics.median(values), min=min(values),
              max=max(values), values=values)  # fmt: skip


def compare(case: str, rounds: list[dict]) -> list[dict]:
  out = []
  for metric, ours, ref, bigger in COMPARE[case]:
    per = [
      (r[ours][metric] / r[ref][metric]) if bigger
      else (r[ref][metric] / r[ours][metric])
      for r in rounds
    ]  # fmt: skip
    mo = statistics.median(r[ours][metric] for r in rounds)
    mr = statistics.median(r[ref][metric] for r in rounds)
    ratio = mo / mr if bigger else mr / mo
    out.append(dict(metric=metric, ours=ours, reference=ref,
                    speedup_of_medians=ratio,
                    speedup_per_round=_summary(per)))  # fmt: skip
  return out


def run_ab(case: str, repeats: int, quick: bool) -> dict:
  from multians_jax.bench import measure as bench

  sides = SIDES[case]
  with tempfile.TemporaryDirectory() as workdir:
    prep = _child(["prepare", workdir] + (["--quick"] if quick else []))
    rounds, loads = [], []
    for _ in range(repeats):
      row = {}
      for impl in sides:
        loads.append(dict(side=impl, load_avg_1m=os.getloadavg()[0]))
        row[impl] = _child(
          ["side", case, impl, workdir, prep["hf_dir"]]
          + (["--quick"] if quick else [])
        )
      rounds.append(row)
  metrics = sorted({k for r in rounds for s in r.values() for k in s})
  per_side = {
    impl: {
      k: _summary([r[impl][k] for r in rounds])
      for k in metrics
      if all(k in r[impl] for r in rounds)
    }
    for impl in sides
  }
  return {
    "machine": bench.machine(),
    "command": " ".join(sys.argv),
    "case": case,
    "shape": SHAPES[quick],
    "prompt_lengths": prep["prompt_lengths"],
    "repeats": repeats,
    "order": list(sides),
    "sides": per_side,
    "comparisons": compare(case, rounds),
    "load": loads,
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("case", choices=(*SIDES, "side", "prepare"))
  parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None, help="also write JSON here")
  parser.add_argument("--quick", action="store_true", help="tiny shapes")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  if args.case == "prepare":
    out = prepare(args.rest[0], args.quick)
  elif args.case == "side":
    case, impl, workdir, hf_dir = args.rest
    inputs = dict(np.load(os.path.join(workdir, "inputs.npz")))
    out = SIDE_FNS[case](impl, hf_dir, inputs, SHAPES[args.quick])
  else:
    out = run_ab(args.case, args.repeats, args.quick)
    print(json.dumps(out, indent=2))
  if args.out:
    with open(args.out, "w") as f:
      f.write(json.dumps(out, indent=2) + "\n")
  return out


if __name__ == "__main__":
  main()
