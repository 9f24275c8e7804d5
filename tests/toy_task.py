"""A toy multi-answer task small enough for a random 2-layer model to learn.

Each vocabulary item is a whole answer block, so a random policy emits a
well-formed 2-answer completion (``<answer1>x</answer1><answer2>y</answer2>``)
with probability ≈ 7 % and a correct one less often: enough reward variance
for group-relative policy gradients from the first step.
"""

import os

import jax
import ml_collections
import numpy as np
from flax import nnx
from transformers import PreTrainedTokenizerFast

from multians_jax import checkpoint, sharding, telemetry
from multians_jax.data.datasets import distlab

COLOURS = ("red", "blue", "green")
SPECIAL = ["<pad>", "<eos>", "[UNK]"]
BLOCKS = [f"<answer{i}>{c}</answer{i}>" for i in (1, 2) for c in COLOURS]
VOCAB = SPECIAL + BLOCKS + ["foo", "bar"]


def tokenizer() -> PreTrainedTokenizerFast:
  return distlab.word_tokenizer(
    VOCAB[len(SPECIAL) :],  # ids as VOCAB lists them
    BLOCKS,
    "{% for m in messages %}{{ m['content'] }} {% endfor %}",
  )


def records(n: int) -> list[dict]:
  return [
    {
      "id": f"toy-{i}",
      "question": "colours?",
      "answers": [["red"], ["blue"]],
      "context": "",
      "tests": "",
      "meta": {},
      "family": "qa",
    }
    for i in range(n)
  ]


def config(steps: int = 12) -> ml_collections.ConfigDict:
  from configs import tiny

  c = tiny.get_config()
  c.steps = steps
  c.model.tokenizer = ""
  c.model.arch.vocab_size = len(VOCAB)
  c.model.arch.d_model = 32
  c.data.prompts_per_step = 4
  c.data.min_bucket = 16
  c.sampler.max_new_tokens = 2
  c.reward.mode = "multi_rlvr"
  c.reward.num_answers = 2
  c.reward.correctness = "count"
  c.reward.preset = "paper"
  c.reward.require_think = False
  c.rl.num_generations = 16
  c.rl.micro_batches = 2
  c.optim.lr = 1e-2
  c.ckpt.every_steps = 100
  c.eval.before_after = False
  c.log.tensorboard = False
  return c


# ---------------------------------------------------------------------------
# Reading back a training run's WORKDIR

VOLATILE = ("time", "tokens_per_sec")  # metrics that differ between runs


def restore(workdir, step=None, items=None):
  """(model, meta, items) of WORKDIR's checkpoint ``step`` (default: the
  latest), restored on one device."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  ck = checkpoint.Checkpointer(
    os.path.join(workdir, "checkpoints"), async_save=False
  )
  try:
    return ck.restore(mesh, sharding.TRAIN_RULES, step=step, items=items)
  finally:
    ck.close()


def params(workdir, step=None):
  """(checkpoint meta, parameter arrays) of a checkpoint."""
  m, meta, _ = restore(workdir, step)
  state = nnx.state(m, nnx.Param)
  return meta, [np.asarray(x) for x in jax.tree.leaves(state)]


def training_rows(workdir):
  """The per-step training rows of metrics.jsonl, without timings."""
  rows = telemetry.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return [
    {k: v for k, v in r.items() if not k.startswith(VOLATILE)}
    for r in rows
    if "reward/total" in r
  ]
