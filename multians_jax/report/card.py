"""Model cards: the README.md of every Hugging Face export.

A card has YAML front matter (``huggingface_hub.ModelCardData``: base
model, licence, tags) and says how the model was made: the method in one
paragraph, the training config, and the before / after evaluation table
when the export comes from a training run (``export.finish``, or
``tools/orbax_to_hf.py`` on a run's checkpoints).
"""

from __future__ import annotations

import glob
import json
import os

from multians_jax import sources
from multians_jax.report import run as report

METHOD = {
  "rlvr": (
    "single-answer RL with verifiable rewards (RLVR): one answer per "
    "generation, rewarded 1 when it matches a gold answer"
  ),
  "rlcr": (
    "single-answer RL with calibration rewards (RLCR): one answer and a "
    "confidence per generation, rewarded for correctness minus the Brier "
    "score of the confidence"
  ),
  "multi_rlvr": (
    "multi-answer RL with verifiable rewards (Multi-RLVR): K distinct "
    "candidate answers in one generation, rewarded for the set's coverage "
    "of the gold answers"
  ),
  "multi_rlcr": (
    "multi-answer RL with calibration rewards (Multi-RLCR): K distinct "
    "candidate answers in one generation, each with a confidence, rewarded "
    "for the set's coverage of the gold answers minus a multi-answer Brier "
    "score of the confidences"
  ),
}


def render(
  model_cfg,
  *,
  run_config: dict | None = None,
  summaries: dict | None = None,
  step: int | None = None,
) -> str:
  """The card's text. ``run_config``: the training config as a dict (the
  ConfigDict's ``to_dict()``); ``summaries``: evaluation tag → summary."""
  from huggingface_hub import ModelCardData

  run_config = run_config or {}
  reward = run_config.get("reward", {})
  mode = reward.get("mode")
  source = run_config.get("model", {}).get("path", "")
  hub_id, licence = sources.base_model(source)
  tags = ["multians_jax", "jax", "flax"]
  if mode:
    tags += ["reinforcement-learning", mode.replace("_", "-")]
  if model_cfg.lora_rank:
    tags.append("lora")
  data = ModelCardData(
    base_model=hub_id,
    license=licence,
    library_name="transformers",
    pipeline_tag="text-generation",
    tags=tags,
  )
  name = run_config.get("data", {}).get("name")
  lines = ["---", data.to_yaml(), "---", "", "# Model card", ""]
  if mode:
    k = reward.get("num_answers")
    how = METHOD.get(mode, f"RL in mode {mode}")
    if mode.startswith("multi") and k:
      how = how.replace("K distinct", f"K = {k} distinct")
    lines += [
      f"Trained with multians_jax by {how}, with a "
      "group-relative policy-gradient update"
      + (f" on the `{name}` dataset" if name else "")
      + (f" for {step} steps" if step is not None else "")
      + f", starting from `{source}`."
      + _lora_note(model_cfg),
      "",
    ]
  else:
    lines += [
      f"Exported by multians_jax from `{source or 'a checkpoint'}`.",
      "",
    ]
  lines += [
    f"Architecture: {model_cfg.family}, {model_cfg.num_layers} layers, "
    f"d_model {model_cfg.d_model}, vocabulary {model_cfg.vocab_size}.",
    "",
  ]
  if summaries:
    lines += ["## Evaluation", "", report.summary_table(summaries), ""]
  if run_config:
    lines += [
      "## Training config",
      "",
      "```json",
      json.dumps(run_config, indent=2, sort_keys=True, default=str),
      "```",
      "",
    ]
  return "\n".join(lines)


def _lora_note(cfg) -> str:
  if not cfg.lora_rank:
    return ""
  return (
    f" Only rank-{cfg.lora_rank} LoRA adapters (alpha {cfg.lora_alpha:g}, "
    f"on {', '.join(cfg.lora_targets)}) were trained; they are merged into "
    "these weights."
  )


def from_workdir(workdir: str) -> tuple[dict | None, dict | None, int | None]:
  """(run config, evaluation summaries, last evaluated step) of a training
  WORKDIR (its ``config.json`` and ``eval/*.json``); Nones where absent."""
  run_config = summaries = step = None
  path = os.path.join(workdir, "config.json")
  if os.path.isfile(path):
    with open(path) as f:
      run_config = json.load(f)
  for p in sorted(glob.glob(os.path.join(workdir, "eval", "*.json"))):
    with open(p) as f:
      ev = json.load(f)
    tag = ev.get("tag")
    if tag in dict(report.SUMMARY_COLUMNS):
      summaries = summaries or {}
      summaries[tag] = ev["summary"]
      if tag == "after":
        step = ev.get("step")
  return run_config, summaries, step


def write_card(out: str, model_cfg, **kw) -> str:
  """Writes ``out/README.md`` (``render``); returns its path."""
  path = os.path.join(out, "README.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write(render(model_cfg, **kw))
  return path
