"""``distlab``: a distributional lab whose optimum is known exactly.

Each of ``num_questions`` synthetic patient cases has a hidden answer
distribution p(·|q) over ``support`` plausible diagnoses (unequal
probabilities) drawn from a pool of ``len(NAMES)`` names; the pool's other
names are implausible for that case (p = 0), distractors a model may still
say. Every *record* is one patient: the case's question and one gold answer
drawn from p(·|q). Many records share a question and differ in their gold
answer, so the uncertainty is irreducible and every objective has a
closed-form optimum (docs/METHOD.md, "The distributional lab"):

- RLVR: the mode a_(1), expected accuracy max p; RLCR adds q = p(a_(1)).
- Multi-RLVR (K answers, ``count``): the K most likely answers, expected
  coverage P(gold ∈ set) = Σ_{i<=K} p(a_(i)).
- Multi-RLCR: the same set with confidences q_i = p(a_(i)).

Both splits hold every case (the test split has fresh gold draws: held-out
*patients*, not held-out questions; there is nothing to generalise to
across cases). ``meta`` keeps p: ``{"case": i, "distribution": {"answers":
[names], "probs": [p...], "train_probs": [p̂...]}, "distractors":
[names]}`` (answers sorted by p, descending; p̂ the gold frequencies among
the case's training patients), from which evaluation computes expected
coverage and the distance of stated confidences from p and from p̂
(``metrics.distribution_summary``). A finite training split is what the
objective sees: its Brier optimum is q = p̂, which differs from p by the
sampling error of ``train_per_question`` draws (STUDY.md §1).

``tokenizer()`` is the lab's word-level tokenizer for tiny random models:
every answer *block* (``<answer2>flu</answer2>``), confidence block on a
0.05 grid (``<confidence1>0.35</confidence1>``) and the analysis block is
one token, and the chat template keeps only the user's question. A policy
is then a few categorical choices per completion, so a 2-layer model learns
the lab in minutes on a CPU while the completions are still parsed, matched
and scored by the real reward path.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from multians_jax.data import prompts
from multians_jax.data.datasets import base, schema

NAMES = (
  "influenza",
  "pneumonia",
  "bronchitis",
  "asthma",
  "sinusitis",
  "tuberculosis",
  "pertussis",
  "laryngitis",
  "measles",
  "allergy",
  "embolism",
  "sarcoidosis",
  "pleurisy",
  "croup",
  "mononucleosis",
  "reflux",
  "anemia",
  "lupus",
  "malaria",
  "dengue",
  "sepsis",
  "histoplasmosis",
  "legionellosis",
  "psittacosis",
)
QUESTION = "Cough , fever and fatigue . Diagnoses for case {case}"
MAX_SLOTS = 5  # answer / confidence blocks exist for slots 1..MAX_SLOTS
CONF_STEP = 0.05  # confidence grid of the lab tokenizer


@dataclasses.dataclass(eq=False)
class DistlabConfig(tfds.core.BuilderConfig):
  """Sizes of the lab (seeded: the same config always builds the same)."""

  num_questions: int = 8  # cases, each with its own p(·|q)
  support: int = 6  # plausible answers per case (p > 0)
  train_per_question: int = 64  # patients (records) per case, train split
  test_per_question: int = 8  # patients per case, test split
  alpha: float = 2.0  # Dirichlet concentration of p
  min_gap: float = 0.04  # p(a_(i)) - p(a_(i+1)) for i <= 3: a unique top set
  seed: int = 0


def distribution(cfg: DistlabConfig, case: int):
  """(support names sorted by p, probs, distractor names) of one case."""
  rng = np.random.default_rng([cfg.seed, case])
  while True:
    p = np.sort(rng.dirichlet([cfg.alpha] * cfg.support))[::-1]
    p = np.round(p, 2)
    p[0] += 1.0 - p.sum()  # probs on a 0.01 grid, summing to one
    gaps = -np.diff(p[: min(4, cfg.support)])
    if p[-1] >= 0.01 and np.all(gaps >= cfg.min_gap):
      break
  names = [str(n) for n in rng.permutation(NAMES)]
  answers, distractors = names[: cfg.support], names[cfg.support :]
  return answers, [round(float(x), 2) for x in p], sorted(distractors)


def records(cfg: DistlabConfig) -> dict[str, list[dict]]:
  """Records of both splits: one gold draw from p(·|q) per patient."""
  if not 2 <= cfg.support <= len(NAMES):
    raise ValueError(f"distlab: support must be in [2, {len(NAMES)}]")
  out = {"train": [], "test": []}
  for case in range(cfg.num_questions):
    answers, probs, distractors = distribution(cfg, case)
    rng = np.random.default_rng([cfg.seed, case, 1])
    draws = {
      split: rng.choice(len(answers), size=n, p=np.asarray(probs))
      for split, n in (
        ("train", cfg.train_per_question),
        ("test", cfg.test_per_question),
      )
    }
    # The gold frequencies of the training patients: the p the training
    # objective sees (its Brier optimum is q = these, not p).
    freq = np.bincount(draws["train"], minlength=len(answers))
    train_probs = [round(float(x), 6) for x in freq / len(draws["train"])]
    meta = {
      "case": case,
      "distribution": {
        "answers": answers,
        "probs": probs,
        "train_probs": train_probs,
      },
      "distractors": distractors,
    }
    for split in ("train", "test"):
      for j, d in enumerate(draws[split]):
        out[split].append(
          schema.make(
            f"{split}-case{case}-{j}",
            QUESTION.format(case=case),
            [[answers[int(d)]]],
            family="ddx",
            meta=meta,
          )
        )
  return out


class Distlab(base.RecordBuilder):
  """Synthetic cases with a known answer distribution (no external data)."""

  name = "distlab"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "1.1.0": "meta.distribution.train_probs: the training golds' frequencies.",
  }
  BUILDER_CONFIGS = [
    DistlabConfig(name="default", description="8 cases x (64 + 8) patients"),
    DistlabConfig(
      name="large",
      description="8 cases x (1024 + 8) patients: training frequencies "
      "within about 0.01 of p",
      train_per_question=1024,
    ),
    DistlabConfig(
      name="small",
      description="4 cases x (32 + 8) patients (tests)",
      num_questions=4,
      train_per_question=32,
    ),
  ]
  DESCRIPTION = __doc__
  LICENSE = "Apache-2.0 (generated by this project)."

  def _records(self, dl_manager) -> dict[str, list[dict]]:
    del dl_manager
    return records(self.builder_config)


# ------------------------------------------------------------ tokenizer


def conf_strings() -> list[str]:
  """Confidence values of the grid as ``prompts.format_completion`` writes
  them (``0``, ``0.05``, …, ``1``)."""
  n = round(1 / CONF_STEP)
  return [f"{round(i * CONF_STEP, 4):.4g}" for i in range(n + 1)]


def blocks() -> list[str]:
  """Every one-token block of the lab's completion formats."""
  out = []
  for tag in ["answer"] + [f"answer{i}" for i in range(1, MAX_SLOTS + 1)]:
    out += [f"<{tag}>{n}</{tag}>" for n in NAMES]
  for tag in ["confidence"] + [
    f"confidence{i}" for i in range(1, MAX_SLOTS + 1)
  ]:
    out += [f"<{tag}>{v}</{tag}>" for v in conf_strings()]
  out.append(f"<analysis>{prompts.DEFAULT_ANALYSIS}</analysis>")
  return out


def word_tokenizer(
  words, blocks, chat_template: str
) -> PreTrainedTokenizerFast:
  """A whitespace word-level tokenizer (``<pad>`` 0, ``<eos>`` 1, ``[UNK]``
  2, then ``words``) with ``blocks`` as single added tokens."""
  vocab = ["<pad>", "<eos>", "[UNK]", *words]
  tok = Tokenizer(
    models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]")
  )
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok,
    unk_token="[UNK]",
    pad_token="<pad>",
    eos_token="<eos>",
  )
  fast.add_tokens(list(blocks))
  fast.chat_template = chat_template
  return fast


def tokenizer() -> PreTrainedTokenizerFast:
  """The lab's word-level tokenizer (see the module docstring)."""
  words = sorted(
    {w for c in range(100) for w in QUESTION.format(case=c).split()}
  )
  return word_tokenizer(
    words,
    blocks(),
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ m['content'] }}{% endif %}{% endfor %}",
  )
