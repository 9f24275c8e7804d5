"""What a finished training run leaves behind: the Hugging Face export
with its model card, and the report of its evaluations."""

from __future__ import annotations

import json
import os

import jax
from absl import logging
from flax import nnx

from multians_jax import sharding
from multians_jax.config import RunConfig
from multians_jax.interop import hf
from multians_jax.report import card
from multians_jax.report import run as report


def finish(run: RunConfig, workdir: str, graphdef, params, tok, evals) -> None:
  """Process 0 writes ``run.export.hf_dir`` (+ model card) and the report
  (``run.export.report``); the export gathers the parameters collectively
  first, so every process calls this. ``evals``: tag → EvalResult."""
  if run.export.hf_dir and jax.process_count() > 1:  # collective: all processes
    params = jax.tree.map(sharding.host_array, params)
  if jax.process_index() != 0:
    return
  if run.export.hf_dir:
    out = os.path.join(workdir, run.export.hf_dir)
    policy = nnx.merge(graphdef, params)
    hf.save(policy, out, tokenizer=tok)
    # main.py's config.json; evaluations of earlier sessions of a resumed run
    run_config, earlier, _ = card.from_workdir(workdir)
    if run_config is None:  # trained from Python: the typed config
      run_config = json.loads(json.dumps(run.to_dict(), default=str))
    card.write_card(
      out,
      policy.cfg,
      run_config=run_config,
      summaries={
        **(earlier or {}),
        **{k: v.summary for k, v in evals.items()},
      },
      step=run.steps,
    )
    logging.info("exported %s", out)
  if run.export.report:
    report.write_report(workdir, evals, run.eval.num_generations)
