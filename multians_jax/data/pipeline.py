"""Prompt pipeline: records → shuffled, chat-templated PromptBatch.

Shape letters: P prompts per batch, T prompt length (a bucket).

The stream is global: every process builds the same batches (the trainer
samples them as one batch sharded over the mesh), so there is no
per-process sharding of the records.

1. Epoch order: a permutation of the N records seeded by (seed, epoch)
   (identity when ``shuffle=False``).
2. Rendering: ``prompts.build_messages`` → the tokenizer's chat template
   (``add_generation_prompt=True``) → token ids (``add_special_tokens=False``:
   the template already holds BOS/role tokens).
3. Prompts longer than ``max_prompt_len`` tokens are dropped and counted
   (``num_dropped``), never truncated.
4. Batching: P prompts, left-padded to a length bucket: the smallest
   ``min_bucket * 2**i`` that fits the longest prompt, capped at
   ``max_prompt_len`` (so the shapes, hence compilations, are at most
   ``log2(max_prompt_len / min_bucket) + 2``). Batches run on across epoch
   ends; with ``num_epochs`` set, the last batch may be smaller than P.

The mask comes from the token counts, never from ``tokens != pad_id``
(SmolLM2's pad token ``<|im_end|>`` occurs inside every ChatML prompt).

Resumption: the iterator is a pure function of (records, tokenizer, config,
state); ``get_state()`` is a small JSON-able dict (epoch, position in the
epoch order, counters, seed) saved with the checkpoint, and ``set_state()``
resumes so that the following batches equal those of an uninterrupted run.
A plain per-epoch permutation is used rather than grain: the drop counter
and the epoch-spanning batches then live in one small, version-independent
state dict, and the logic is a few lines.
"""

import os

import flax.struct
import jax
import numpy as np

from multians_jax import settings
from multians_jax.data import datasets, prompts

# This module's settings (defined in the leaf settings.py).
PipelineConfig = settings.PipelineConfig

STATE_VERSION = 1


@flax.struct.dataclass
class PromptBatch:
  """P left-padded prompts and the host-side data the reward needs.

  Attributes:
    tokens: [P, T] int32 token ids, left-padded.
    mask: [P, T] bool, True on real prompt tokens.
    positions: [P, T] int32, 0 at each prompt's first real token (0 on pads).
    gold: P gold sets (lists of entries, each a list of aliases).
    tests: P test strings ("" when none).
    ids: P record ids (which records a batch holds).
    metas: P record ``meta`` dicts (e.g. the lab's answer distribution).
  """

  tokens: np.ndarray
  mask: np.ndarray
  positions: np.ndarray
  gold: list = flax.struct.field(pytree_node=False)
  tests: list = flax.struct.field(pytree_node=False)
  ids: list = flax.struct.field(pytree_node=False)
  metas: list = flax.struct.field(pytree_node=False, default=None)


def bucket_length(length: int, min_bucket: int, max_len: int) -> int:
  """The padded length T for a longest prompt of ``length`` tokens."""
  if length > max_len:
    raise ValueError(f"prompt of {length} tokens exceeds max {max_len}")
  bucket = min_bucket
  while bucket < length:
    bucket *= 2
  return min(bucket, max_len)


def render(record: dict, tokenizer, cfg: PipelineConfig) -> list[int]:
  """Token ids of one record's chat-templated prompt."""
  messages = prompts.build_messages(
    record["question"],
    cfg.mode,
    record["family"],
    cfg.num_answers,
    context=record["context"] or None,
  )
  text = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=False
  )
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def left_pad_rows(rows: list[list[int]], length: int, pad_id: int):
  """[P, T] tokens, mask, positions for ``rows`` left-padded to ``length``."""
  p = len(rows)
  tokens = np.full((p, length), pad_id, np.int32)
  mask = np.zeros((p, length), bool)
  positions = np.zeros((p, length), np.int32)
  for i, row in enumerate(rows):
    n = len(row)
    tokens[i, length - n :] = row
    mask[i, length - n :] = True
    positions[i, length - n :] = np.arange(n)
  return tokens, mask, positions


def _pad_id(tokenizer) -> int:
  for pid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if pid is not None:
      return int(pid)
  return 0


class PromptIterator:
  """Iterator of ``PromptBatch``es over a random-access record source.

  Args:
    source: ``len()`` and ``[i]`` → decoded record (``datasets.load``).
    tokenizer: a ``transformers`` tokenizer with a chat template.
    cfg: the pipeline settings.
  """

  def __init__(self, source, tokenizer, cfg: PipelineConfig):
    self.source, self.tokenizer, self.cfg = source, tokenizer, cfg
    self.num_examples = len(source)
    if not self.num_examples:
      raise ValueError("the record source is empty")
    self.pad_id = _pad_id(tokenizer)
    self.epoch = self.position = 0
    self.num_dropped = self.num_prompts = self.num_batches = 0
    self._order = (None, None)

  def order(self, epoch: int) -> np.ndarray:
    """Record indices of ``epoch`` in stream order."""
    if self._order[0] != epoch:
      n = self.num_examples
      if self.cfg.shuffle:
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(n)
      else:
        order = np.arange(n)
      self._order = (epoch, order)
    return self._order[1]

  def _next_record(self) -> dict | None:
    """The next record of the stream (advancing the state), None at end."""
    if self.position == self.num_examples:
      self.epoch, self.position = self.epoch + 1, 0
    if self.cfg.num_epochs is not None and self.epoch >= self.cfg.num_epochs:
      return None
    self.position += 1
    return self.source[int(self.order(self.epoch)[self.position - 1])]

  def _collect(self):
    records, rows, dropped_run = [], [], 0
    while len(rows) < self.cfg.batch_size:
      record = self._next_record()
      if record is None:
        break
      ids = render(record, self.tokenizer, self.cfg)
      if len(ids) > self.cfg.max_prompt_len:
        self.num_dropped += 1
        dropped_run += 1
        # A run of drops can span an epoch end (tail of one epoch, head of
        # the next), so only 2 epochs' worth proves every prompt too long.
        if dropped_run >= 2 * self.num_examples:
          raise ValueError(
            f"every prompt is longer than max_prompt_len="
            f"{self.cfg.max_prompt_len}"
          )
        continue
      dropped_run = 0
      records.append(record)
      rows.append(ids)
    return records, rows

  def __iter__(self):
    return self

  def __next__(self) -> PromptBatch:
    records, rows = self._collect()
    if not rows:
      raise StopIteration
    length = bucket_length(
      max(map(len, rows)), self.cfg.min_bucket, self.cfg.max_prompt_len
    )
    tokens, mask, positions = left_pad_rows(rows, length, self.pad_id)
    self.num_prompts += len(rows)
    self.num_batches += 1
    return PromptBatch(
      tokens=tokens,
      mask=mask,
      positions=positions,
      gold=[r["answers"] for r in records],
      tests=[r["tests"] for r in records],
      ids=[r["id"] for r in records],
      metas=[r.get("meta") or {} for r in records],
    )

  def get_state(self) -> dict:
    """JSON-serialisable state; ``set_state`` of it resumes exactly."""
    return {
      "version": STATE_VERSION,
      "seed": self.cfg.seed,
      "shuffle": self.cfg.shuffle,
      "num_examples": self.num_examples,
      "epoch": self.epoch,
      "position": self.position,
      "num_dropped": self.num_dropped,
      "num_prompts": self.num_prompts,
      "num_batches": self.num_batches,
    }

  def set_state(self, state: dict) -> None:
    """Restores ``get_state()`` output; rejects a state of another stream."""
    mine = self.get_state()
    for key in ("version", "seed", "shuffle"):
      if state.get(key) != mine[key]:
        raise ValueError(
          f"iterator state has {key}={state.get(key)!r} but this pipeline "
          f"has {mine[key]!r}"
        )
    if state.get("num_examples") != self.num_examples:
      raise ValueError(
        f"iterator state is for {state.get('num_examples')} records, the "
        f"source has {self.num_examples}"
      )
    position, epoch = int(state["position"]), int(state["epoch"])
    if not 0 <= position <= self.num_examples:
      raise ValueError(f"iterator state position {position} out of range")
    self.epoch, self.position = epoch, position
    self.num_dropped = int(state["num_dropped"])
    self.num_prompts = int(state["num_prompts"])
    self.num_batches = int(state["num_batches"])


def open_split(dc, workdir: str, split: str):
  """The records of ``split`` of the configured dataset (``dc``: the run's
  ``config.DataConfig``), built on first use into ``dc.data_dir`` (or
  ``WORKDIR/data``)."""
  data_dir = os.path.abspath(dc.data_dir or os.path.join(workdir, "data"))
  kwargs = {}
  if dc.jsonl:
    kwargs = {
      "jsonl": [p.strip() for p in dc.jsonl.split(",") if p.strip()],
      "family": dc.family,
    }
  name, _, config = dc.name.partition("/")
  if config:
    kwargs["config"] = config
  # Process 0 builds first (a shared data_dir is built once); the others
  # then find it built, or build their own copy on a host-local disk.
  if jax.process_index() == 0:
    datasets.build(name, data_dir, **kwargs)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("multians_jax data built")
    if jax.process_index() != 0:
      datasets.build(name, data_dir, **kwargs)
  return datasets.load(dc.name, split, data_dir)
