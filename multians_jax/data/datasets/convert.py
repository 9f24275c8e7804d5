"""Converters from the paper's datasets (local copies) to the JSONL schema.

Each converter reads one file in a dataset's common public export and yields
schema objects (dicts with ``id``, ``question``, ``answers``, ``context``,
``tests``, ``meta``, ``family``); ``convert_file`` validates them and writes
JSONL atomically. Field mapping:

ddxplus (CSV or JSON/JSONL rows of the DDXPlus release or its HF export)
  id        ← ``id`` column if present, else ``ddxplus-<row>``
  question  ← "Sex: S. Age: A. Chief complaint: <INITIAL_EVIDENCE>.
               Findings: <EVIDENCES>. What is the diagnosis?" (codes rendered
               with ``release_evidences.json`` when given, else raw codes)
  answers   ← one entry per pathology of ``DIFFERENTIAL_DIAGNOSIS`` (a list
               of [name, probability], as text or JSON), ordered by
               probability; aliases: the name, plus its English name from
               ``release_conditions.json`` when given
  meta      ← ``pathology`` (``PATHOLOGY``), ``probabilities``
  family    ← ``ddx``
hotpotqa (the HotpotQA JSON list, or a modified copy with paragraphs removed)
  id        ← ``_id``
  question  ← ``question``
  answers   ← ``answers`` if the row has it (list of strings or alias lists:
               the modified, multi-answer version), else [[``answer``]]
  context   ← the ``context`` paragraphs: "Title: sentence sentence ..."
  meta      ← ``type``, ``level``, ``supporting_facts``
ambigqa (the AmbigQA / AmbigNQ JSON list)
  id        ← ``id``
  question  ← ``question``
  answers   ← ``annotations``: a ``singleAnswer`` gives one entry (its
               ``answer`` aliases); ``multipleQAs`` gives one entry per
               ``qaPairs`` item (its ``answer`` aliases); entries from all
               annotators that share a normalised alias are merged
  meta      ← ``disambiguations``: the qaPairs' questions
mbpp (the MBPP JSONL, original or sanitized)
  id        ← ``mbpp-<task_id>``
  question  ← ``text`` (or ``prompt``) + "Your code should pass these
               tests:" + the ``test_list`` asserts (the standard MBPP prompt)
  answers   ← [] (graded by tests)
  tests     ← ``test_setup_code`` + ``test_list`` asserts
  meta      ← ``task_id``, ``code`` (reference solution)
  family    ← ``code``
"""

import ast
import csv
import json
import os
import tempfile
from collections.abc import Iterator

from multians_jax.data.datasets import schema


def _read_rows(path: str) -> list[dict]:
  """Rows of a CSV, JSON list, or JSONL file."""
  if path.endswith(".csv"):
    with open(path, encoding="utf-8", newline="") as f:
      return list(csv.DictReader(f))
  with open(path, encoding="utf-8") as f:
    text = f.read()
  stripped = text.lstrip()
  if stripped.startswith("["):
    return json.loads(text)
  rows = []
  for lineno, line in enumerate(text.splitlines(), start=1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
  return rows


def _literal(value):
  """A list given as a JSON or Python literal string (or already a list)."""
  if not isinstance(value, str):
    return value
  try:
    return json.loads(value)
  except json.JSONDecodeError:
    return ast.literal_eval(value)


def _evidence_text(code: str, evidences: dict | None) -> str:
  if not evidences:
    return code
  name, _, value = code.partition("_@_")
  ev = evidences.get(name)
  if ev is None:
    return code
  text = ev.get("question_en", name)
  if value:
    meaning = ev.get("value_meaning", {}).get(value, {})
    text = f"{text} {meaning.get('en', value)}"
  return text


def ddxplus(
  path: str, evidences: str | None = None, conditions: str | None = None
) -> Iterator[dict]:
  """DDXPlus patients → differential-diagnosis records (see module doc)."""
  ev = _load_json(evidences)
  cond = _load_json(conditions)
  for i, row in enumerate(_read_rows(path)):
    ddx = sorted(_literal(row["DIFFERENTIAL_DIAGNOSIS"]), key=lambda x: -x[1])
    findings = [_evidence_text(c, ev) for c in _literal(row["EVIDENCES"])]
    question = (
      f"Sex: {row['SEX']}. Age: {row['AGE']}. Chief complaint: "
      f"{_evidence_text(row['INITIAL_EVIDENCE'], ev)}. Findings: "
      f"{'; '.join(findings)}. What is the diagnosis?"
    )
    answers = []
    for name, _ in ddx:
      english = (cond.get(name) or {}).get("cond-name-eng")
      answers.append(
        [name] + ([english] if english and english != name else [])
      )
    yield {
      "id": str(row.get("id") or f"ddxplus-{i}"),
      "question": question,
      "answers": answers,
      "meta": {
        "pathology": row["PATHOLOGY"],
        "probabilities": [float(p) for _, p in ddx],
      },
      "family": "ddx",
    }


def _load_json(path: str | None) -> dict:
  if not path:
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _entries(items) -> list[list[str]]:
  return [[x] if isinstance(x, str) else list(x) for x in items]


def hotpotqa(path: str) -> Iterator[dict]:
  """HotpotQA rows → QA records with their paragraphs as context."""
  for row in _read_rows(path):
    answers = row.get("answers")
    paragraphs = [
      f"{title}: {' '.join(s.strip() for s in sentences)}"
      for title, sentences in row.get("context", [])
    ]
    yield {
      "id": row["_id"],
      "question": row["question"],
      "answers": _entries(answers) if answers else [[row["answer"]]],
      "context": "\n\n".join(paragraphs),
      "meta": {
        k: row[k] for k in ("type", "level", "supporting_facts") if k in row
      },
      "family": "qa",
    }


def _merge(entries: list[list[str]]) -> list[list[str]]:
  """Merges entries that share a normalised alias (annotator duplicates)."""
  merged = []
  for entry in entries:
    keys = {schema.norm(a) for a in entry}
    for other in merged:
      if keys & {schema.norm(a) for a in other}:
        other.extend(a for a in entry if a not in other)
        break
    else:
      merged.append(list(dict.fromkeys(entry)))
  return merged


def ambigqa(path: str) -> Iterator[dict]:
  """AmbigQA rows → QA records whose gold set spans the interpretations."""
  for row in _read_rows(path):
    entries, questions = [], []
    for ann in row.get("annotations", []):
      if ann["type"] == "singleAnswer":
        entries.append(list(ann["answer"]))
      else:
        for pair in ann["qaPairs"]:
          entries.append(list(pair["answer"]))
          questions.append(pair["question"])
    yield {
      "id": str(row["id"]),
      "question": row["question"],
      "answers": _merge(entries),
      "meta": {"disambiguations": questions},
      "family": "qa",
    }


def mbpp(path: str) -> Iterator[dict]:
  """MBPP rows → code records graded by their asserts."""
  for row in _read_rows(path):
    asserts = "\n".join(row["test_list"])
    setup = row.get("test_setup_code") or ""
    text = row.get("text") or row.get("prompt")
    yield {
      "id": f"mbpp-{row['task_id']}",
      "question": f"{text}\nYour code should pass these tests:\n\n{asserts}",
      "answers": [],
      "tests": f"{setup}\n{asserts}\n" if setup else f"{asserts}\n",
      "meta": {"task_id": row["task_id"], "code": row.get("code", "")},
      "family": "code",
    }


CONVERTERS = {
  "ddxplus": ddxplus,
  "hotpotqa": hotpotqa,
  "ambigqa": ambigqa,
  "mbpp": mbpp,
}


def convert_file(fmt: str, src: str, out: str, **kwargs) -> int:
  """Converts ``src`` to schema JSONL at ``out``; returns the row count.

  Every object is validated first; ``out`` is written to a temp file and
  renamed, so a failure leaves no partial output.
  """
  if fmt not in CONVERTERS:
    raise ValueError(f"unknown format {fmt!r}; one of {sorted(CONVERTERS)}")
  lines = []
  for i, obj in enumerate(CONVERTERS[fmt](src, **kwargs)):
    schema.validate(obj, where=f"{src}: converted row {i}")
    lines.append(json.dumps(obj, ensure_ascii=False))
  out_dir = os.path.dirname(os.path.abspath(out))
  fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
    os.replace(tmp, out)
  except BaseException:
    os.unlink(tmp)
    raise
  return len(lines)
