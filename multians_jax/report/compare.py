"""One report from several runs' held-out evaluations (``tools/compare.py``).

A run is a training WORKDIR (its ``eval/<tag>.json``, default ``after``,
falling back to ``warmup``) or an output directory of ``tools/evaluate.py``
(``eval.json``); both are written by ``evaluate.write_json``. Runs whose
names differ only by a trailing seed tag (``_s0``, ``_s1``, ``_seed2``) are
one *group*: tables give their mean and spread (min–max), plots their mean
with the min–max band.

Per run (``compare.json``): ``mode``, ``seed``, ``coverage`` (P(a
generation's answers hold the gold): the expectation under the known p
in the distributional lab, else the empirical pass@A), ``oracle_coverage``
(lab only; the top-A mass), ``recall@k`` for k = 3..30 (lab: P(gold among
k answers); else the fraction of gold entries hit), ``unique@30``,
``top1``, ``ece``, ``conf_abs_err`` (mean |q − p|, lab only),
``conf_train_err`` (mean |q − p̂|, p̂ the training golds' frequencies;
lab runs that evaluated it) and ``tokens_per_distinct_correct``.
Training WORKDIRs that evaluated during training (``eval.every_steps``)
also get learning curves (``curves.png``) and per-step tables of coverage
and mean |q − p|. A run trained for pass@k (``pass_k``,
``rl.advantage='passk'``) is judged by its own objective: ``coverage`` of
its k samples, ``oracle_coverage`` the exact optimum of pass@k with k
samples (``metrics.passk_optimum``).
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from multians_jax.data import prompts
from multians_jax.report import plotting

KS = tuple(range(3, 31, 3))
_SEED_TAG = re.compile(r"(_s|_seed)\d+$")


def eval_file(path: str, tag: str = "after") -> str:
  """The evaluation JSON of a WORKDIR or an evaluate.py output dir."""
  for cand in (
    os.path.join(path, "eval", f"{tag}.json"),
    os.path.join(path, "eval", "warmup.json"),
    os.path.join(path, "eval.json"),
    path,
  ):
    if os.path.isfile(cand):
      return cand
  raise FileNotFoundError(
    f"{path}: no evaluation found (expected eval/{tag}.json in a training "
    "WORKDIR or eval.json from tools/evaluate.py)"
  )


def load(path: str, tag: str = "after") -> dict:
  """The evaluation record of one run (see ``evaluate.to_json``)."""
  f = eval_file(path, tag)
  try:
    with open(f) as fh:
      rec = json.load(fh)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{f}: unreadable evaluation file ({e})") from e
  if "summary" not in rec:
    raise ValueError(f"{f}: not an evaluation file (no 'summary')")
  rec["path"] = f
  return rec


def _num(x):
  return None if x is None or not math.isfinite(float(x)) else float(x)


def row(rec: dict) -> dict:
  """The compare.json entry of one run."""
  s = rec["summary"]
  a = prompts.slots(rec.get("mode") or "rlvr", rec.get("num_answers") or 1)
  lab = "dist/coverage" in s
  recall = {}
  for k in KS:
    v = s.get(f"dist/coverage@{k}" if lab else f"recall@{k}")
    if v is not None:
      recall[str(k)] = float(v)
  budget = rec.get("details", {}).get("budget", 30)
  coverage = s.get("dist/coverage") if lab else s.get(f"pass@{a}")
  oracle = s.get("dist/oracle_coverage")
  k = rec.get("pass_k")
  if k:  # trained for pass@k: its k samples against its own optimum
    coverage = s.get(f"dist/coverage@{k}" if lab else f"pass@{k}")
    oracle = s.get(f"dist/passk_optimum@{k}")
  return {
    "mode": rec.get("mode"),
    "seed": rec.get("seed"),
    "pass_k": k,
    "coverage": _num(coverage),
    "oracle_coverage": _num(oracle),
    "recall@k": recall,
    "unique@30": _num(s.get("unique@30", s.get(f"unique@{budget}"))),
    "top1": _num(s.get("dist/top1_p") if lab else s.get("top1_accuracy")),
    "max_p": _num(s.get("dist/max_p")),
    "ece": _num(s.get("ece")),
    "conf_abs_err": _num(s.get("dist/conf_abs_err")),
    "conf_train_err": _num(s.get("dist/conf_train_err")),
    "tokens_per_distinct_correct": _num(s.get("tokens_per_distinct_correct")),
    "completion_tokens": _num(s.get("completion_tokens")),
  }


def group_name(name: str) -> str:
  return _SEED_TAG.sub("", name)


def groups(names) -> dict[str, list[str]]:
  out: dict[str, list[str]] = {}
  for n in names:
    out.setdefault(group_name(n), []).append(n)
  return out


def _stats(values) -> tuple[float, float, float, int] | None:
  v = [x for x in values if x is not None]
  if not v:
    return None
  return float(np.mean(v)), float(min(v)), float(max(v)), len(v)


def _cell(values) -> str:
  st = _stats(values)
  if st is None:
    return "–"
  mean, lo, hi, n = st
  return (
    f"{mean:.3f}" if n == 1 or hi == lo else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"
  )


RUN_COLUMNS = (
  ("coverage", "coverage"),
  ("oracle_coverage", "oracle"),
  ("top1", "top-1"),
  ("max_p", "max p"),
  ("unique@30", "unique@30"),
  ("ece", "ECE"),
  ("conf_abs_err", "mean abs(q − p)"),
  ("conf_train_err", "mean abs(q − p̂)"),
  ("tokens_per_distinct_correct", "tokens / distinct correct"),
)


def runs_table(runs: dict[str, dict]) -> str:
  """Markdown: one line per group, mean [min, max] over its seeds."""
  g = groups(runs)
  cols = [
    c for c in RUN_COLUMNS if any(r[c[0]] is not None for r in runs.values())
  ]
  lines = [
    "| run | mode | seeds | " + " | ".join(t for _, t in cols) + " |",
    "|---|---|---|" + "---|" * len(cols),
  ]
  for name, members in g.items():
    rs = [runs[m] for m in members]
    cells = [_cell([r[k] for r in rs]) for k, _ in cols]
    seeds = ",".join(str(r["seed"]) for r in rs)
    lines.append(
      f"| {name} | {rs[0]['mode']} | {seeds} | " + " | ".join(cells) + " |"
    )
  return "\n".join(lines)


def _band(ax, xs, ys_per_run, label, **kw):
  arr = np.array(ys_per_run, float)
  mean = np.nanmean(arr, 0)
  (line,) = ax.plot(xs, mean, marker=".", label=label, **kw)
  if len(arr) > 1:
    ax.fill_between(
      xs,
      np.nanmin(arr, 0),
      np.nanmax(arr, 0),
      alpha=0.2,
      color=line.get_color(),
    )


def plot_recall(path, runs, recs):
  plt = plotting.pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for name, members in groups(runs).items():
    ks = sorted(
      set.intersection(*[set(map(int, runs[m]["recall@k"])) for m in members])
    )
    if not ks:
      continue
    ys = [[runs[m]["recall@k"][str(k)] for k in ks] for m in members]
    _band(ax, ks, ys, name)
  oracle = [
    [recs[m]["summary"].get(f"dist/oracle@{k}") for k in KS] for m in runs
  ]
  if oracle and all(v is not None for v in oracle[0]):
    ax.plot(KS, oracle[0], "k--", lw=1, label="oracle (top-k mass)")
  ax.set_xlabel("answers k (single-answer: k samples; K-answer: k/K gens)")
  ax.set_ylabel("recall@k")
  ax.set_ylim(0, 1.02)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_unique(path, runs, recs):
  plt = plotting.pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  g = groups(runs)
  values = {
    n: sum((recs[m].get("details", {}).get("unique", []) for m in ms), [])
    for n, ms in g.items()
  }
  top = max([max(v) for v in values.values() if v] + [1])
  bins = np.arange(0.5, top + 1.5)
  for n, v in values.items():
    if v:
      ax.hist(v, bins=bins, histtype="step", lw=1.5, label=n, density=True)
  ax.set_xlabel("unique answers among 30 sampled answers (per prompt)")
  ax.set_ylabel("fraction of prompts")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_reliability(path, runs, recs) -> bool:
  plt = plotting.pyplot()
  pooled = {}
  for n, ms in groups(runs).items():
    bins = [recs[m].get("details", {}).get("reliability") for m in ms]
    bins = [b for b in bins if b]
    if bins:
      pooled[n] = {
        k: np.sum([b[k] for b in bins], 0)
        for k in ("count", "sum_conf", "sum_correct")
      }
  if not pooled:
    return False
  fig, axes = plt.subplots(
    1, len(pooled), figsize=(3.2 * len(pooled), 3.4), squeeze=False
  )
  for ax, (n, b) in zip(axes[0], pooled.items(), strict=True):
    m = b["count"] > 0
    conf = b["sum_conf"][m] / b["count"][m]
    acc = b["sum_correct"][m] / b["count"][m]
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.scatter(conf, acc, s=10 + 200 * b["count"][m] / b["count"].sum())
    ax.plot(conf, acc, lw=1)
    ax.set_title(n, fontsize=9)
    ax.set_xlabel("stated confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
  axes[0][0].set_ylabel("fraction correct")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def plot_tokens(path, runs) -> bool:
  plt = plotting.pyplot()
  g = groups(runs)
  names, means, lo, hi = [], [], [], []
  for n, ms in g.items():
    st = _stats([runs[m]["tokens_per_distinct_correct"] for m in ms])
    if st:
      names.append(n)
      means.append(st[0])
      lo.append(st[0] - st[1])
      hi.append(st[2] - st[0])
  if not names:
    return False
  fig, ax = plt.subplots(figsize=(5.5, 3.5))
  ax.bar(names, means, yerr=[lo, hi], capsize=3)
  ax.set_ylabel("completion tokens per distinct correct answer")
  ax.tick_params(axis="x", labelrotation=30, labelsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


CURVES = (
  ("coverage", "coverage"),
  ("conf_abs_err", "mean abs(q − p)"),
  ("ece", "ECE"),
  ("unique@30", "unique@30"),
)


def history(path: str) -> list[tuple[int, dict]]:
  """(step, compare row) of every held-out evaluation a training WORKDIR
  holds: after the warm-up (step 0), every ``eval.every_steps``
  (``eval/step<N>.json``) and after RL; sorted by step. Empty for other
  directories."""
  d = os.path.join(path, "eval")
  if not os.path.isdir(d):
    return []
  names = ["warmup.json", "after.json"] + [
    f for f in os.listdir(d) if re.fullmatch(r"step\d+\.json", f)
  ]
  out = {}
  for f in names:
    fp = os.path.join(d, f)
    if os.path.isfile(fp):
      rec = load(fp)
      out[int(rec.get("step") or 0)] = row(rec)
  return sorted(out.items())


def plot_curves(path, hist: dict[str, list]) -> bool:
  """Held-out figures against the RL step, mean and min–max over seeds,
  for the groups whose runs evaluate at the same steps."""
  plt = plotting.pyplot()
  series = {}
  for name, members in groups(hist).items():
    steps = [tuple(s for s, _ in hist[m]) for m in members]
    if len(steps[0]) >= 3 and all(st == steps[0] for st in steps):
      series[name] = (
        list(steps[0]),
        [[r for _, r in hist[m]] for m in members],
      )
  keys = [
    (k, t)
    for k, t in CURVES
    if any(
      r[k] is not None for _, rs in series.values() for rr in rs for r in rr
    )
  ]
  if not series or not keys:
    return False
  fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.3))
  cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  colour = {n: cycle[i % len(cycle)] for i, n in enumerate(series)}
  for ax, (k, t) in zip(np.atleast_1d(axes), keys, strict=True):
    for name, (steps, rows) in series.items():  # one colour per group
      ys = [[np.nan if r[k] is None else r[k] for r in rr] for rr in rows]
      if not np.all(np.isnan(ys)):
        _band(ax, steps, ys, name, color=colour[name])
    ax.set_xlabel("RL step")
    ax.set_title(t, fontsize=9)
  np.atleast_1d(axes)[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def curve_table(hist: dict[str, list], key: str = "coverage") -> str:
  """Markdown: ``key`` per evaluated step (columns), one line per group."""
  g = groups(hist)
  steps = sorted({s for h in hist.values() for s, _ in h})
  if len(steps) < 3:
    return ""
  lines = [
    f"| {key} at step | " + " | ".join(map(str, steps)) + " |",
    "|---|" + "---|" * len(steps),
  ]
  for name, members in g.items():
    cells = []
    for st in steps:
      vals = [dict(hist[m]).get(st, {}).get(key) for m in members]
      cells.append(_cell(vals))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_comparison(
  runs_spec: dict[str, str], out: str, tag: str = "after"
) -> dict:
  """Reads each run, writes OUT/compare.{json,md} and the PNGs."""
  if not runs_spec:
    raise ValueError("--runs: give at least one NAME=DIR")
  recs = {n: load(p, tag) for n, p in runs_spec.items()}
  runs = {n: row(r) for n, r in recs.items()}
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "compare.json"), "w") as f:
    json.dump({"runs": runs}, f, indent=1)
  plot_recall(os.path.join(out, "recall_at_k.png"), runs, recs)
  plot_unique(os.path.join(out, "unique_answers.png"), runs, recs)
  pics = ["recall_at_k.png", "unique_answers.png"]
  if plot_reliability(os.path.join(out, "reliability.png"), runs, recs):
    pics.append("reliability.png")
  if plot_tokens(os.path.join(out, "tokens.png"), runs):
    pics.append("tokens.png")
  hist = {n: history(p) for n, p in runs_spec.items()}
  hist = {n: h for n, h in hist.items() if h}
  curves = ""
  if hist and plot_curves(os.path.join(out, "curves.png"), hist):
    pics.append("curves.png")
    curves = "\n\n".join(
      t for t in (curve_table(hist, k) for k, _ in CURVES[:2]) if t
    )
  lines = [
    "# Comparison",
    "",
    "Mean over seeds, [min, max] where seeds differ.",
    "",
    runs_table(runs),
    "",
    *(
      ["Held-out figures per RL step (0: after the warm-up):", "", curves, ""]
      if curves
      else []
    ),  # fmt: skip
    *[f"![{p}]({p})" for p in pics],
    "",
    "Sources:",
    "",
    *[f"- {n}: `{r['path']}`" for n, r in recs.items()],
    "",
  ]
  with open(os.path.join(out, "compare.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
  return runs


def parse_runs(spec: str) -> dict[str, str]:
  """``NAME=DIR,NAME=DIR`` → {name: dir} (clear error on a bad item)."""
  out = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise ValueError(f"--runs: {item!r} is not NAME=DIR")
    if name in out:
      raise ValueError(f"--runs: name {name!r} given twice")
    out[name] = path
  return out
