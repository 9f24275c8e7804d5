"""Prepare data: convert the paper's datasets to JSONL, build TFDS datasets.

Convert a local copy of DDXPlus, HotpotQA (modified), AmbigQA or MBPP to
the JSONL schema (field mapping:
``multians_jax.data.datasets.convert``
and docs/GUIDE.md, "Data")::

  python tools/prepare_data.py convert --format=mbpp \\
      --src=mbpp.jsonl --out=data/train_mbpp.jsonl
  python tools/prepare_data.py convert --format=ddxplus \\
      --src=release_test_patients.csv --out=data/test_ddxplus.jsonl \\
      --evidences=release_evidences.json --conditions=release_conditions.json

Build a registered dataset (array_record files, no TensorFlow needed)::

  python tools/prepare_data.py build --name=countries --data_dir=~/tfds
  python tools/prepare_data.py build --name=hpo_ddx --config=small \\
      --data_dir=~/tfds
  python tools/prepare_data.py build --name=multians_jsonl --data_dir=~/tfds \\
      --jsonl=data/train_mbpp.jsonl --jsonl=data/test_mbpp.jsonl

JSONL files whose names start with train/test/validation keep that split;
others are pooled and split 80/20 without leakage.
"""

import argparse
import os
import sys

from multians_jax.data import datasets
from multians_jax.data.datasets import convert


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  sub = parser.add_subparsers(dest="command", required=True)
  conv = sub.add_parser("convert", help="convert a dataset file to JSONL")
  conv.add_argument(
    "--format", required=True, choices=sorted(convert.CONVERTERS)
  )
  conv.add_argument("--src", required=True, help="input file (CSV/JSON/JSONL)")
  conv.add_argument("--out", required=True, help="output .jsonl file")
  conv.add_argument("--evidences", help="ddxplus: release_evidences.json")
  conv.add_argument("--conditions", help="ddxplus: release_conditions.json")
  build = sub.add_parser("build", help="build a registered TFDS dataset")
  build.add_argument("--name", required=True, choices=sorted(datasets.BUILDERS))
  build.add_argument("--data_dir", required=True, help="TFDS data dir")
  build.add_argument("--config", help="builder config (hpo_ddx: default|small)")
  build.add_argument(
    "--jsonl", action="append", help="multians_jsonl: input file (repeat)"
  )
  build.add_argument("--manual_dir", help="multians_jsonl: dir of *.jsonl")
  build.add_argument("--family", default="qa", help="multians_jsonl default")
  return parser


def _convert(args) -> None:
  kwargs = {}
  if args.format == "ddxplus":
    kwargs = dict(evidences=args.evidences, conditions=args.conditions)
  elif args.evidences or args.conditions:
    raise SystemExit("--evidences/--conditions apply to --format=ddxplus only")
  n = convert.convert_file(args.format, args.src, args.out, **kwargs)
  print(f"wrote {n} records to {args.out}")


def _build(args) -> None:
  kwargs = {}
  if args.config:
    kwargs["config"] = args.config
  if args.name == "multians_jsonl":
    kwargs.update(jsonl=args.jsonl, family=args.family)
  elif args.jsonl or args.manual_dir:
    raise SystemExit("--jsonl/--manual_dir apply to --name=multians_jsonl only")
  data_dir = os.path.expanduser(args.data_dir)
  builder = datasets.build(
    args.name, data_dir, manual_dir=args.manual_dir, **kwargs
  )
  counts = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f"built {args.name} in {builder.data_dir}: {counts}")


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  {"convert": _convert, "build": _build}[args.command](args)


if __name__ == "__main__":
  main(sys.argv[1:])
