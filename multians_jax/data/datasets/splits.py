"""Deterministic, leakage-free train/test splits.

Records that share a *key* must land in the same split. Keys of a record:

- ``q:<normalised question>``;
- ``a:<answer-set key>`` (order-free, normalised; skipped for empty sets);
- ``g:<group>`` for each group in ``meta["split_groups"]`` (e.g. the subject
  country, so every question about one country stays on one side).

Records are joined into connected components over shared keys (union-find);
each component goes to ``test`` when a hash of (salt, its smallest key) falls
below ``test_fraction``, else to ``train``. The result depends only on the
records and the salt, not on their order or on Python's hash seed.
"""

import hashlib
import json

from multians_jax.data.datasets import schema


def record_keys(record: dict) -> list[str]:
  """The keys that tie ``record`` (encoded, JSON-string fields) to others."""
  keys = ["q:" + schema.norm(record["question"])]
  answers = json.loads(record["answers"])
  if answers:
    keys.append("a:" + schema.answer_key(answers))
  meta = json.loads(record["meta"])
  keys.extend("g:" + str(g) for g in meta.get("split_groups", []))
  return keys


class _UnionFind:
  def __init__(self):
    self.parent = {}

  def find(self, x: str) -> str:
    self.parent.setdefault(x, x)
    while self.parent[x] != x:
      self.parent[x] = self.parent[self.parent[x]]
      x = self.parent[x]
    return x

  def union(self, a: str, b: str) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      self.parent[max(ra, rb)] = min(ra, rb)


def _unit_hash(salt: str, key: str) -> float:
  digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def assign(
  records: list[dict], test_fraction: float, salt: str
) -> dict[str, list[dict]]:
  """Splits records into ``{"train": [...], "test": [...]}`` without leaks.

  Args:
    records: encoded records (see ``schema``).
    test_fraction: expected fraction of components sent to ``test``.
    salt: mixes into the hash so different datasets split independently.

  Returns:
    The two splits, each in the input order.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  uf = _UnionFind()
  all_keys = [record_keys(r) for r in records]
  for keys in all_keys:
    for k in keys[1:]:
      uf.union(keys[0], k)
  out = {"train": [], "test": []}
  for record, keys in zip(records, all_keys, strict=True):
    # The root is the smallest key of the component (union keeps the min).
    root = uf.find(keys[0])
    side = "test" if _unit_hash(salt, root) < test_fraction else "train"
    out[side].append(record)
  return out


def leaks(train: list[dict], test: list[dict]) -> set[str]:
  """Keys present in both splits (empty for a clean split)."""
  train_keys = {k for r in train for k in record_keys(r)}
  return {k for r in test for k in record_keys(r)} & train_keys
