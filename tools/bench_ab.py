"""Fresh-process A/B benchmarks: ours against transformers / torch (JSON).

Run: ``python tools/bench_ab.py {sampler,natural,train,rl,ckpt} [--repeats=3]
[--out=FILE.json] [--quick] [--reference-python=PATH] [--sides=A,B]``.

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
* ``rl``: one full RL step (sample, score, advantages, update) on the
  ``natural`` case's chat prompts × G=8, against TRL's ``GRPOTrainer``
  (``multians_jax/bench/trl_ref.py``) on the same model, prompts, G,
  temperature 0.7, learning rate and 4 micro-batches (gradient
  accumulation): ``ours`` / ``trl`` at natural lengths (EOS stops, cap
  256), ``ours_forced`` / ``trl_forced`` at exactly 128 tokens. Ours:
  ``multians_jax/bench/rl_step.py``. Per side the step's wall time and its
  sampling (with scoring) and update parts. The TRL sides run under
  ``--reference-python`` (default: this interpreter), a virtualenv with
  the pinned trl / transformers / torch (BENCHMARKS.md); ``--sides``
  runs a subset (e.g. ours alone where TRL is not installed).

* ``ckpt``: host memory of a training checkpoint save on CPU: SmolLM2's
  parameters and AdamW moments (random, as after training: zeros would
  compress to nothing), 1.6 GB, saved as a training step saves them
  (``checkpoint.save_train_state``, asynchronously, then waited for) with
  each chunk compressed (``compressed``, the default) and stored as it is
  (``uncompressed``, ``ckpt.compress=False``); the layout, OCDBT, is the
  same. Per side: resident memory added at the save's
  peak and left after it (sampled every 10 ms), the seconds until ``save``
  returns and until the write is done.

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
  "rl": ("ours", "trl", "ours_forced", "trl_forced"),
  "ckpt": ("compressed", "uncompressed"),
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
  "rl": [
    (metric, ours, ref, False)
    for ours, ref in (("ours", "trl"), ("ours_forced", "trl_forced"))
    for metric in ("step_s", "sample_s", "update_s")
  ],
  "ckpt": [("peak_added_gb", "uncompressed", "compressed", False)],
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


def side_rl(impl, hf_dir, inputs, sh):
  with open(os.path.join(os.path.dirname(hf_dir), "rl.json")) as f:
    rl = json.load(f)
  forced = impl.endswith("_forced")
  kw = dict(
    group=sh["group"],
    new_tokens=sh["new_tokens"] if forced else sh["natural_new"],
    micro=sh["micro"],
    forced=forced,
    temperature=0.7,
  )
  if impl.startswith("trl"):
    from multians_jax.bench import trl_ref  # imports no JAX

    try:
      return trl_ref.grpo_step(
        hf_dir, rl["texts"], rl["gold"], workdir=os.path.dirname(hf_dir), **kw
      )
    except ImportError as e:
      raise SystemExit(
        f"the TRL side cannot import {e.name!r} under {sys.executable}: "
        "make the reference virtualenv (BENCHMARKS.md) and pass "
        "--reference-python"
      ) from None
  from multians_jax.bench import rl_step

  ids, mask = inputs["nat_ids"], inputs["nat_mask"]
  return rl_step.time_step(hf_dir, ids, mask, rl["gold"], **kw)


def side_ckpt(impl, hf_dir, inputs, sh):
  import threading

  import jax
  from flax import nnx

  from multians_jax import checkpoint, hostmem
  from multians_jax.rl import update

  model, _ = _ours(hf_dir)
  tx = update.optimizer(update.OptimConfig())
  state = update.init_state(model, tx)
  key = iter(jax.random.split(jax.random.PRNGKey(0), 4096))
  moments = lambda x: (
    jax.random.normal(next(key), x.shape, x.dtype) * 1e-3
    if x.ndim else x
  )  # fmt: skip
  state = state.replace(opt_state=jax.tree.map(moments, state.opt_state))
  jax.block_until_ready(state)
  rss = hostmem.resident_bytes
  peak, done = [0], threading.Event()

  def watch():
    while not done.is_set():
      peak[0] = max(peak[0], rss())
      time.sleep(0.01)

  time.sleep(0.5)
  base = peak[0] = rss()
  threading.Thread(target=watch, daemon=True).start()
  ckpt = checkpoint.Checkpointer(
    os.path.join(os.path.dirname(hf_dir), f"ckpt_{impl}_{os.getpid()}"),
    compress=impl == "compressed",
  )
  call_s, _ = _timed(
    lambda: checkpoint.save_train_state(
      ckpt, 1, nnx.split(model)[0], state, tokenizer=None, meta={}
    )
  )
  wait_s, _ = _timed(ckpt.wait)
  time.sleep(0.5)
  done.set()
  ckpt.close()
  gb = 1e9
  leaves = jax.tree.leaves((state.params, state.opt_state))
  return dict(
    saved_gb=sum(x.nbytes for x in leaves) / gb,
    peak_added_gb=(peak[0] - base) / gb,
    left_after_gb=(rss() - base) / gb,
    save_call_s=call_s,
    save_total_s=call_s + wait_s,
  )


SIDE_FNS = {"sampler": side_sampler, "natural": side_natural,
            "train": side_train, "rl": side_rl,
            "ckpt": side_ckpt}  # fmt: skip


# ---------------------------------------------------------------------------
# Inputs shared by every side


def prepare(workdir: str, quick: bool, case: str) -> dict:
  """The HF directory both sides load, and the inputs (``inputs.npz``;
  for ``rl`` also ``rl.json``: the prompts' text and gold sets)."""
  import jax

  from multians_jax import config
  from multians_jax.bench import measure as bench
  from multians_jax.data import pipeline as data
  from multians_jax.data.datasets import base, countries
  from multians_jax.interop import hf
  from multians_jax.rl import update

  sh = SHAPES[quick]
  model, tok = bench.load("tiny" if quick else "smollm2")
  if quick and case == "rl":  # a tokenizer for both sides' chat prompts
    model, tok = _tiny_with_tokenizer(bench)
  # SmolLM2 ships as GGUF: both sides load this exported fp32 directory.
  hf_dir = os.path.join(workdir, "hf")
  hf.save(model, hf_dir, tokenizer=tok)
  cfg, p = model.cfg, sh["prompts"]
  recs = []
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
  if recs:
    with open(os.path.join(workdir, "rl.json"), "w") as f:
      texts = [tok.decode(r) for r in rows]
      json.dump(dict(texts=texts, gold=[r["answers"] for r in recs]), f)
  return dict(hf_dir=hf_dir, prompt_lengths=[len(r) for r in rows])


def _tiny_with_tokenizer(bench):
  """The tiny random model at SmolLM2's vocabulary, with its tokenizer."""
  import jax

  from multians_jax import sharding, sources
  from multians_jax.model import transformer as model_lib

  tok = sources.load_tokenizer("smollm2")
  cfg = bench.TINY.replace(
    vocab_size=len(tok), eos_token_id=tok.eos_token_id,
    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
  )  # fmt: skip
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  return model_lib.init_model(cfg, mesh, sharding.TRAIN_RULES), tok


# ---------------------------------------------------------------------------
# The driver


def _child(args: list[str], python: str | None = None) -> dict:
  path = [HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
  with tempfile.NamedTemporaryFile(suffix=".json") as f:
    cmd = [python or sys.executable, os.path.abspath(__file__), *args,
           f"--out={f.name}"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(
        f"benchmark process {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
      )
    return json.loads(open(f.name).read())


def _summary(values: list[float]) -> dict:
  return dict(median=statistics.median(values), min=min(values),
              max=max(values), values=values)  # fmt: skip


def compare(case: str, rounds: list[dict], sides) -> list[dict]:
  out = []
  for metric, ours, ref, bigger in COMPARE[case]:
    if ours not in sides or ref not in sides:
      continue
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


def run_ab(case: str, repeats: int, quick: bool, reference_python=None,
           sides=None) -> dict:  # fmt: skip
  from multians_jax.bench import measure as bench

  sides = sides or SIDES[case]
  flag = ["--quick"] if quick else []
  with tempfile.TemporaryDirectory() as workdir:
    prep = _child(["prepare", workdir, case] + flag)
    rounds, loads = [], []
    for _ in range(repeats):
      row = {}
      for impl in sides:
        loads.append(dict(side=impl, load_avg_1m=os.getloadavg()[0]))
        python = reference_python if impl.startswith("trl") else None
        row[impl] = _child(
          ["side", case, impl, workdir, prep["hf_dir"]] + flag, python
        )
      rounds.append(row)
  number = lambda v: isinstance(v, (int, float))
  per_side, info = {}, {}
  for impl in sides:
    keys = sorted(set.intersection(*(set(r[impl]) for r in rounds)))
    per_side[impl] = {
      k: _summary([r[impl][k] for r in rounds])
      for k in keys
      if number(rounds[0][impl][k])
    }
    info[impl] = {k: v for k, v in rounds[0][impl].items() if not number(v)}
  return {
    "machine": bench.machine(),
    "command": " ".join(sys.argv),
    "case": case,
    "shape": SHAPES[quick],
    "prompt_lengths": prep["prompt_lengths"],
    "repeats": repeats,
    "order": list(sides),
    "sides": per_side,
    "side_info": {k: v for k, v in info.items() if v},
    "comparisons": compare(case, rounds, sides),
    "load": loads,
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("case", choices=(*SIDES, "side", "prepare"))
  parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None, help="also write JSON here")
  parser.add_argument("--quick", action="store_true", help="tiny shapes")
  parser.add_argument(
    "--reference-python",
    default=None,
    help="interpreter of the TRL sides (rl): a virtualenv with trl",
  )
  parser.add_argument("--sides", default="", help="a subset, e.g. ours,trl")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  sides = tuple(x for x in args.sides.split(",") if x)
  if args.case in SIDES and not set(sides) <= set(SIDES[args.case]):
    parser.error(f"--sides: {args.case} has sides {SIDES[args.case]}")
  if args.reference_python and not os.access(args.reference_python, os.X_OK):
    parser.error(
      f"--reference-python: no interpreter at {args.reference_python}"
    )
  if args.case == "prepare":
    out = prepare(args.rest[0], args.quick, args.rest[1])
  elif args.case == "side":
    case, impl, workdir, hf_dir = args.rest
    inputs = dict(np.load(os.path.join(workdir, "inputs.npz")))
    out = SIDE_FNS[case](impl, hf_dir, inputs, SHAPES[args.quick])
  else:
    out = run_ab(
      args.case, args.repeats, args.quick, args.reference_python, sides
    )
    print(json.dumps(out, indent=2))
  if args.out:
    with open(args.out, "w") as f:
      f.write(json.dumps(out, indent=2) + "\n")
  return out


if __name__ == "__main__":
  main()
