"""Benchmark of the full reward path: parse + exact match + kernel.

Run: ``python tools/bench_reward.py [--num 1024] [--chars 1000] [--k 3]``;
prints a JSON dict. Target: 1,024 completions of ~1,000 characters with
K = 3 in under 0.5 s (after the first call's jit compile).
"""

import argparse
import json

from multians_jax.bench.reward import bench_reward


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--num", type=int, default=1024)
  parser.add_argument("--chars", type=int, default=1000)
  parser.add_argument("--k", type=int, default=3)
  args = parser.parse_args()
  print(json.dumps(bench_reward(args.num, args.chars, args.k), indent=2))


if __name__ == "__main__":
  main()
