"""Benchmarks of the sampler, the update step and the reward path (JSON).

Run: ``python tools/bench.py {sampler,train,reward,profile,all}
[--out=FILE.json] [--quick]``. Prints one JSON object (and writes it to
``--out``). Results and the machine they came from are recorded in
``BENCHMARKS.md``.

One run, one warm measurement per side (each torch reference in a spawned
process of its own): a quick reading of FLOP/s, MFU and the RL iteration's
time split. Ratios against transformers / torch that are reported come from
``tools/bench_ab.py``: fresh processes, alternating, with repeats.

Shape letters: P prompts, G completions per prompt, B = P·G rows, T prompt
tokens, L new (completion) tokens, S = T + L sequence, M micro-batches.

* ``sampler``: SmolLM2-135M fp32, P=8 × G=8, T=128, L=128, temperature 0.7,
  no stop token (every row generates L tokens). Completion tokens/s of
  ``sampler.sample`` (warm; compile time reported apart) against
  ``transformers``' ``generate`` on the same weights (exported with
  ``hf.save``) and the same settings, and decode FLOP/s as a
  fraction of the measured matmul peak.
* ``train``: tokens/s and model FLOP utilisation (6·N·B·S / time / peak) of
  ``update.update_step`` at B×S = 64×256 (P=8 prompts × G=8, prompt 128 +
  completion 128) against a ``transformers`` forward + backward + AdamW step
  of the same model and shapes. Ours runs twice on the same batch: with
  shared prompts (``group_size = G``, the trainer's default: each prompt
  once per group) and in the plain per-row layout (the computation
  transformers does). Tokens/s counts the B·S tokens trained on in both; for
  the shared layout, which does fewer FLOPs, 6·N·B·S / time is an
  *effective* MFU. Plus one RL iteration's time split (sampling / reward /
  update) on a small batch.
* ``reward``: ``multians_jax.bench.reward.bench_reward``.
* ``profile``: where a decode step's time goes at the ``sampler`` shape:
  a ``jax.profiler`` trace of 32 decode steps, each op of the compiled
  decode loop timed and grouped (projections, LM head, attention scores
  and values, the rest); ms per step and shares (``profile_decode``).

FLOP conventions. N = parameters used by matmuls per token: every parameter
(SmolLM2 ties the embedding, so it counts once, as the LM head). Decode
FLOPs per token = 2·N + 4·layers·heads·head_dim·ctx (QKᵀ and PV over the
ctx slots the sampler attends to: all S cache slots, masked). Training
FLOPs = 6·N·B·S (the LM head is in fact applied to completion positions
only, in both implementations). The peak is a jitted fp32 2048×2048 matmul.

``--model=tiny`` swaps in a small random Llama (for the smoke test). The
measurements live in ``multians_jax/bench/measure.py``.
"""

from __future__ import annotations

import argparse
import json

from multians_jax.bench import measure


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "which", choices=("sampler", "train", "reward", "profile", "all")
  )
  parser.add_argument("--out", default=None, help="also write JSON here")
  parser.add_argument("--quick", action="store_true", help="tiny shapes")
  parser.add_argument("--model", default="smollm2", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  out = measure.run(args.which, args.quick, args.model)
  text = json.dumps(out, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return out


if __name__ == "__main__":
  main()
