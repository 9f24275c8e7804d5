"""Times the sampler's two decode loops on the same rollout: the static
loop and the refilling loop with as many slots as rows (S = B), which
sample the same tokens (BENCHMARKS.md, "One decode loop or two").

Run one side per process, alternating, e.g.::

  for i in 1 2; do for s in static refill; do
    python tools/bench_loops.py $s; done; done

Prints one JSON object: the side, the warm calls' seconds, the tokens
generated and the first row's first tokens (equal on both sides).
"""

import argparse
import dataclasses
import functools
import json
import time

import jax
import numpy as np
from flax import nnx

from multians_jax import sharding, sources
from multians_jax.model import layers as layers_lib
from multians_jax.model import sampler


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("side", choices=("static", "refill"))
  ap.add_argument("--model", default="smollm2")
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--group", type=int, default=8)
  ap.add_argument("--prompt_len", type=int, default=128)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  a = ap.parse_args()
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  model, _, _ = sources.load_model(a.model, mesh, sharding.TRAIN_RULES)
  rng = np.random.default_rng(0)
  shape = (a.prompts, a.prompt_len)
  tokens = rng.integers(3, model.cfg.vocab_size, shape).astype(np.int32)
  mask = np.ones(shape, bool)
  cfg = sampler.SamplingConfig(  # no stop token: every row runs to the cap
    max_new_tokens=a.new_tokens, temperature=0.7, min_prompt_bucket=0
  )
  g = a.group

  @functools.partial(jax.jit, static_argnames=("graphdef",))
  def run(graphdef, state, tokens, mask, key):
    m = nnx.merge(graphdef, state)
    per_layer = layers_lib.unstack_layers(m.layers.arrays())
    if a.side == "static":
      return sampler._static(m, per_layer, tokens, mask, key, cfg, g)
    every_row = dataclasses.replace(cfg, slots=a.prompts * g)
    return sampler._refilled(m, per_layer, tokens, mask, key, every_row, g)

  graphdef, state = nnx.split(model)
  out = jax.block_until_ready(
    run(graphdef, state, tokens, mask, jax.random.key(0))
  )
  times = []
  for r in range(a.repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(
      run(graphdef, state, tokens, mask, jax.random.key(r + 1))
    )
    times.append(time.perf_counter() - t0)
  print(json.dumps({
    "side": a.side,
    "seconds": times,
    "tokens": int(np.asarray(out.lengths).sum()),
    "first_row": np.asarray(out.tokens)[0, :8].tolist(),
  }))  # fmt: skip


if __name__ == "__main__":
  main()
