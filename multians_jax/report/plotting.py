"""The figures of one evaluation (a reliability diagram, coverage against
the answer budget), drawn with matplotlib, which is imported where a plot
is drawn and not before: the package's numeric modules (``metrics``,
``config``) stay free of it, and its backend is set once, to Agg (files,
no display)."""

import os

import numpy as np

from multians_jax import metrics


def pyplot():
  """``matplotlib.pyplot`` with the Agg backend."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def reliability_diagram(path, confidence, correct, bins: int = 10) -> None:
  """Writes a reliability diagram (accuracy per confidence bin) as PNG."""
  plt = pyplot()
  q = np.nan_to_num(np.asarray(confidence, np.float64)).ravel()
  c = np.asarray(correct, np.float64).ravel()
  idx = np.minimum((q * bins).astype(int), bins - 1)
  acc = [c[idx == i].mean() if (idx == i).any() else 0.0 for i in range(bins)]
  centers = (np.arange(bins) + 0.5) / bins
  fig, ax = plt.subplots(figsize=(4, 4))
  ax.bar(centers, acc, width=1 / bins, edgecolor="k", label="accuracy")
  ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
  ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
  ax.set_title(f"ECE = {metrics.ece(q, c, bins):.3f}")
  ax.legend(loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def coverage_vs_k(path, ks, curves: dict, ylabel="coverage@k") -> None:
  """Writes coverage (or any metric) against the answer budget k as PNG.

  Args:
    path: output PNG path.
    ks: budgets k on the x axis.
    curves: label → values, one per k (e.g. one curve per model).
    ylabel: y-axis label.
  """
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(5, 4))
  for label, values in curves.items():
    if len(values) != len(ks):
      raise ValueError(
        f"curve {label!r} has {len(values)} points for {len(ks)} values of k"
      )
    ax.plot(ks, values, marker="o", label=label)
  ax.set(xlabel="answer budget k", ylabel=ylabel)
  ax.set_xscale("log", base=2)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def eval_figures(result, out_dir: str, g: int) -> list[str]:
  """An ``evaluate.EvalResult``'s reliability diagram and coverage-vs-k
  plot in ``out_dir``; returns the file names."""
  os.makedirs(out_dir, exist_ok=True)
  names = []
  s = result.scores
  f = np.asarray(s.format_ok) > 0
  if not np.all(np.isnan(s.brier)) and f.any():
    reliability_diagram(
      os.path.join(out_dir, "reliability.png"),
      np.asarray(s.confidence)[f],
      np.asarray(s.correct)[f],
    )
    names.append("reliability.png")
  a = np.asarray(s.entry_id).shape[1]
  ks = [a * n for n in range(1, g + 1)]
  curve = [result.summary.get(f"coverage@{k}") for k in ks]
  if all(c is not None for c in curve):
    coverage_vs_k(
      os.path.join(out_dir, "coverage_vs_k.png"), ks, {"policy": curve}
    )
    names.append("coverage_vs_k.png")
  return names
