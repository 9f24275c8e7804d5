"""REPORT.md for a run: before/after table, training curves, reliability."""

from __future__ import annotations

import os

from multians_jax import telemetry
from multians_jax.report import plotting

ROWS = (
  ("format_valid_rate", "format-valid rate", "↑"),
  ("reward/num_correct", "distinct correct answers / generation", "↑"),
  ("coverage@3", "coverage@3", "↑"),
  ("pass@3", "pass@3", "↑"),
  ("set_brier", "set Brier (Σ over K)", "↓"),
  ("ece", "ECE (10 bins)", "↓"),
  ("auroc", "AUROC", "↑"),
  ("mean_conf_sum", "mean Σq", ""),
  ("duplicate_rate", "duplicate rate", "↓"),
  ("reward/total", "reward", "↑"),
  ("completion_tokens", "completion tokens", ""),
)


SUMMARY_COLUMNS = (
  ("before", "before"),
  ("warmup", "after warm-up"),
  ("after", "after RL"),
)


def summary_table(summaries: dict) -> str:
  """Markdown table of the evaluations present, in stage order.

  ``summaries``: tag → summary, tags among ``before``, ``warmup``, ``after``.
  """
  cols = [(t, name) for t, name in SUMMARY_COLUMNS if t in summaries]
  head = "| metric | " + " | ".join(n for _, n in cols) + " | |"
  lines = [head, "|---|" + "---|" * len(cols) + "---|"]
  fmt = lambda d, k: "–" if d.get(k) is None else f"{d[k]:.3f}"
  for key, name, better in ROWS:
    if any(key in summaries[t] for t, _ in cols):
      cells = " | ".join(fmt(summaries[t], key) for t, _ in cols)
      lines.append(f"| {name} | {cells} | {better} |")
  return "\n".join(lines)


def curves(workdir: str, out: str) -> bool:
  plt = plotting.pyplot()
  rows = [
    r
    for r in telemetry.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    if "reward/total" in r
  ]
  if not rows:
    return False
  steps = [r["step"] for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
  for ax, key in zip(
    axes,
    ("reward/total", "format_valid_rate", "reward/num_correct"),
    strict=True,
  ):
    ax.plot(steps, [r.get(key) for r in rows], marker=".")
    ax.set_title(key)
    ax.set_xlabel("step")
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return True


def write_report(workdir: str, evals: dict, g: int) -> str:
  """Writes WORKDIR/REPORT.md (+ PNGs) and returns its path."""
  parts = ["# Training report", ""]
  shown = {t: evals[t].summary for t, _ in SUMMARY_COLUMNS if t in evals}
  if "after" in shown and len(shown) > 1:
    n = shown["after"].get("num_prompts")
    parts += [
      f"Held-out evaluation on {n} prompts, {g} generations each.",
      "",
      summary_table(shown),
      "",
    ]
  if curves(workdir, os.path.join(workdir, "training_curves.png")):
    parts += ["![training curves](training_curves.png)", ""]
  for tag, _ in SUMMARY_COLUMNS:
    res = evals.get(tag)
    if res is None:
      continue
    names = plotting.eval_figures(res, os.path.join(workdir, f"eval_{tag}"), g)
    for name in names:
      parts += [f"![{tag}: {name}](eval_{tag}/{name})", ""]
    sample = res.texts[:2]
    parts += [f"Sample completions ({tag}):", ""]
    parts += ["```text\n" + t.strip()[:600] + "\n```" for t in sample]
    parts += [""]
  path = os.path.join(workdir, "REPORT.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(parts))
  return path
