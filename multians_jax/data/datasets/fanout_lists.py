"""``fanout_lists``: list-valued sub-questions of the FanOutQA dev set.

Read from ``data/fanout-final-dev.json`` inside the ``fanoutqa`` PyPI
package (code MIT; data CC BY-SA 4.0). The package is not imported (its
``__init__`` pulls spaCy and creates a cache dir); only the JSON is read.

Kept: sub-questions (at any depth of a question's decomposition) whose gold
answer is a list of >= 2 distinct strings or numbers, and that do not depend
on another sub-question's answer (declared in ``depends_on``, or a dangling
"in it" / "of these"), since those are not answerable alone. Each list item
is one gold entry with one alias; numbers become their decimal string. A
question asked twice is kept once (first occurrence). ``meta`` holds the
parent question, its id and the evidence Wikipedia page. Splits: hashed
by question/answer-set components, grouped by parent question.
"""

import json
import re

from multians_jax.data.datasets import base, schema

_DESCRIPTION = __doc__
# Sub-questions that refer back to an earlier answer without declaring it.
_DANGLING = re.compile(r"\b(in it|of these)\b", re.IGNORECASE)
_CITATION = """\
@inproceedings{zhu-etal-2024-fanoutqa,
  title={{F}an{O}ut{QA}: A Multi-Hop, Multi-Document Question Answering
         Benchmark for Large Language Models},
  author={Zhu, Andrew and Hwang, Alyssa and Dugan, Liam and
          Callison-Burch, Chris},
  booktitle={Proceedings of the 62nd Annual Meeting of the Association for
             Computational Linguistics (Volume 2: Short Papers)},
  year={2024}
}"""


def _items(answer) -> list[str] | None:
  """The gold list as strings, or None when not a usable list answer."""
  if not isinstance(answer, list):
    return None
  items = []
  for a in answer:
    if isinstance(a, bool) or not isinstance(a, str | int | float):
      return None
    text = str(a).strip()
    if text and text not in items:
      items.append(text)
  return items if len(items) >= 2 else None


def _walk(node: dict, parent: dict):
  for sub in node.get("decomposition") or []:
    yield sub, parent
    yield from _walk(sub, parent)


def records_from(questions: list[dict]) -> list[dict]:
  """Records from the parsed FanOutQA dev JSON (a list of questions)."""
  records, seen = [], set()
  for top in questions:
    for sub, parent in _walk(top, top):
      items = _items(sub.get("answer"))
      key = schema.norm(sub["question"])
      dangling = _DANGLING.search(sub["question"])
      if items is None or sub.get("depends_on") or dangling or key in seen:
        continue
      seen.add(key)
      evidence = sub.get("evidence") or {}
      meta = {
        "parent_id": parent["id"],
        "parent_question": parent["question"],
        "evidence_title": evidence.get("title"),
        "split_groups": [parent["id"]],
      }
      records.append(
        schema.make(
          sub["id"],
          sub["question"],
          [[item] for item in items],
          family="qa",
          meta=meta,
        )
      )
  return records


class FanoutLists(base.RecordBuilder):
  """List questions from FanOutQA (Zhu et al., 2024)."""

  name = "fanout_lists"
  DESCRIPTION = _DESCRIPTION
  CITATION = _CITATION
  LICENSE = "Data: CC BY-SA 4.0 (FanOutQA); fanoutqa package code: MIT."
  HOMEPAGE = "https://github.com/zhudotexe/fanoutqa"

  def _records(self, dl_manager) -> list[dict]:
    path = base.package_file(
      "fanoutqa", "fanoutqa", self.name, "data/fanout-final-dev.json"
    )
    with open(path, encoding="utf-8") as f:
      return records_from(json.load(f))
