"""TRL's ``GRPOTrainer``: the reference side of ``tools/bench_ab.py rl``.

Imports no JAX: it runs under the interpreter ``--reference-python`` names
(a virtualenv with the pinned ``trl``, ``transformers`` and ``torch``;
BENCHMARKS.md says how to make it), on the Hugging Face directory and the
prompts our side uses.

One process trains ``warm + 1`` optimizer steps and reports the last one:
its wall time (``step_s``), the part in ``_generate_and_score_completions``
(``sample_s``: generation, rewards, advantages) and the rest (``update_s``:
forward, backward and AdamW over the gradient-accumulation steps). TRL's
defaults stand except where the comparison needs ours: fp32 (no bf16
autocast), the same G, cap, temperature, learning rate and number of
gradient-accumulation steps, prompts in order, no checkpoints or logs.
"""

from __future__ import annotations

import json
import os
import time

# The version this side was measured with; another one is reported.
PINNED = dict(trl="1.16.0", transformers="5.25.0", torch="2.13.0")


def _reward(completions, gold, **_):
  """Gold entries named in each completion (any alias, case-folded): a
  cheap stand-in for our set reward, so TRL's step is not charged for
  ours."""
  out = []
  for text, entries in zip(completions, gold, strict=True):
    low = text.lower()
    hits = sum(any(a.lower() in low for a in e) for e in json.loads(entries))
    out.append(float(hits))
  return out


def grpo_step(hf_dir: str, prompts: list[str], gold: list, *, group: int,
              new_tokens: int, micro: int, forced: bool, temperature: float,
              workdir: str, warm: int = 1) -> dict:  # fmt: skip
  """Times one warm GRPO step of TRL on ``prompts`` × ``group``."""
  import datasets
  import torch
  import transformers
  import trl

  torch.manual_seed(0)
  rows = len(prompts) * group
  if rows % micro:
    raise ValueError(f"{rows} rows do not split into {micro} micro-batches")
  steps = warm + 1
  data = datasets.Dataset.from_dict(
    {
      "prompt": prompts * steps,
      "gold": [json.dumps(g) for g in gold] * steps,
    }
  )
  args = trl.GRPOConfig(
    output_dir=os.path.join(workdir, "trl"),
    per_device_train_batch_size=rows // micro,
    gradient_accumulation_steps=micro,
    num_generations=group,
    max_completion_length=new_tokens,
    temperature=temperature,
    learning_rate=1e-6,
    max_steps=steps,
    bf16=False,
    use_cpu=True,
    shuffle_dataset=False,
    report_to="none",
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    generation_kwargs={"min_new_tokens": new_tokens} if forced else None,
  )
  trainer = trl.GRPOTrainer(
    model=hf_dir,
    reward_funcs=_reward,
    args=args,
    train_dataset=data,
    processing_class=transformers.AutoTokenizer.from_pretrained(hf_dir),
  )
  clock = _Clock(trainer, transformers.TrainerCallback)
  trainer.train()
  return dict(
    **clock.last_step(),
    versions=dict(
      trl=trl.__version__,
      transformers=transformers.__version__,
      torch=torch.__version__,
    ),
  )


class _Clock:
  """Times the trainer's optimizer steps and, within them, its
  ``_generate_and_score_completions`` (generation, rewards, advantages)."""

  def __init__(self, trainer, callback_base):
    self.starts, self.ends, self.sampled = [], [], []
    generate = trainer._generate_and_score_completions

    def timed(*a, **kw):
      t0 = time.perf_counter()
      out = generate(*a, **kw)
      tokens = int(out["completion_mask"].sum())
      self.sampled.append((time.perf_counter() - t0, tokens))
      return out

    trainer._generate_and_score_completions = timed
    clock = self

    class Callback(callback_base):
      def on_step_begin(self, *_, **__):
        clock.starts.append(time.perf_counter())

      def on_step_end(self, *_, **__):
        clock.ends.append(time.perf_counter())

    trainer.add_callback(Callback())

  def last_step(self) -> dict:
    step = self.ends[-1] - self.starts[-1]
    sample_s, tokens = self.sampled[-1]
    return dict(
      step_s=step,
      sample_s=sample_s,
      update_s=step - sample_s,
      completion_tokens=tokens,
    )
