"""The record schema shared by every builder (METHOD §7), and its validation.

One example (a *record*) has seven text features:

- ``id``: unique within the dataset.
- ``question``: the question or task statement shown to the model.
- ``answers``: the gold set as a JSON string: a list of *entries*, each a
  non-empty list of alias strings, e.g. ``[["United States", "USA"],
  ["Canada"]]``. Stored as JSON so the nested ragged lists stay one simple
  feature. May be ``[]`` only when ``tests`` is set (code tasks are graded
  by their tests).
- ``context``: optional supporting text ("" when absent).
- ``tests``: optional test code for the ``code`` matcher ("" when absent).
- ``meta``: a JSON object as a string (provenance, source ids, ...).
- ``family``: the task family, ``qa`` | ``ddx`` | ``code``; selects the
  system prompt.

TFDS stores text as bytes: ``decode`` turns a stored example back into
Python values (``answers`` a list of lists of str, ``meta`` a dict).
"""

import json
import re
import string

import tensorflow_datasets as tfds

from multians_jax.data.prompts import TASK_FAMILIES

TEXT_FIELDS = ("id", "question", "answers", "context", "tests", "meta")
FIELDS = TEXT_FIELDS + ("family",)


class RecordError(ValueError):
  """A record that does not follow the schema; the message says where."""


def features() -> tfds.features.FeaturesDict:
  """The TFDS features of a record: seven ``Text`` features."""
  return tfds.features.FeaturesDict(
    {name: tfds.features.Text() for name in FIELDS}
  )


def _check_answers(answers, where: str) -> list[list[str]]:
  if not isinstance(answers, list):
    raise RecordError(f"{where}: 'answers' must be a list of alias lists")
  out = []
  for i, entry in enumerate(answers):
    if not isinstance(entry, list) or not entry:
      raise RecordError(
        f"{where}: answers[{i}] must be a non-empty list of alias strings, "
        f"got {entry!r}"
      )
    for alias in entry:
      if not isinstance(alias, str) or not alias.strip():
        raise RecordError(
          f"{where}: answers[{i}] has an empty or non-string alias {alias!r}"
        )
    out.append([alias.strip() for alias in entry])
  return out


def _check_text(obj: dict, key: str, where: str, required: bool) -> str:
  value = obj.get(key)
  if value is None:
    if required:
      raise RecordError(f"{where}: missing required field {key!r}")
    return ""
  if not isinstance(value, str):
    raise RecordError(f"{where}: field {key!r} must be a string")
  if required and not value.strip():
    raise RecordError(f"{where}: field {key!r} is empty")
  return value


def validate(obj, where: str, default_family: str = "qa") -> dict:
  """Checks one JSON object against the schema and returns an encoded record.

  Args:
    obj: a parsed JSON object in the METHOD §7 layout (``answers`` as a list,
      ``meta`` as an object; ``family`` optional).
    where: location used in error messages, e.g. ``"file.jsonl:12"``.
    default_family: family used when ``obj`` has none.

  Returns:
    A dict of the seven fields, all ``str`` (``answers``/``meta`` as JSON).

  Raises:
    RecordError: naming ``where`` and the problem.
  """
  if not isinstance(obj, dict):
    raise RecordError(f"{where}: expected a JSON object, got {type(obj)}")
  if "answers" not in obj:
    raise RecordError(f"{where}: missing required field 'answers'")
  rid = obj.get("id")
  if isinstance(rid, int) and not isinstance(rid, bool):
    rid = str(rid)
  record = {"id": _check_text({"id": rid}, "id", where, required=True)}
  record["question"] = _check_text(obj, "question", where, required=True)
  record["context"] = _check_text(obj, "context", where, required=False)
  record["tests"] = _check_text(obj, "tests", where, required=False)
  answers = _check_answers(obj["answers"], where)
  if not answers and not record["tests"].strip():
    raise RecordError(f"{where}: 'answers' is empty and there are no 'tests'")
  record["answers"] = json.dumps(answers, ensure_ascii=False)
  meta = obj.get("meta") or {}
  if not isinstance(meta, dict):
    raise RecordError(f"{where}: 'meta' must be a JSON object")
  record["meta"] = json.dumps(meta, ensure_ascii=False, sort_keys=True)
  family = obj.get("family") or default_family
  if family not in TASK_FAMILIES:
    raise RecordError(
      f"{where}: unknown family {family!r}; one of {TASK_FAMILIES}"
    )
  record["family"] = family
  return record


def make(rid: str, question: str, answers, family: str, **fields) -> dict:
  """Builds and validates a record from Python values (used by builders)."""
  obj = {"id": rid, "question": question, "answers": answers, "family": family}
  obj.update(fields)
  return validate(obj, where=f"record {rid!r}")


def read_jsonl(path: str, default_family: str = "qa") -> list[dict]:
  """Reads and validates a whole JSONL file; errors name file and line."""
  records = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise RecordError(f"{where}: invalid JSON ({e.msg})") from e
      records.append(validate(obj, where, default_family))
  return records


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode(example: dict) -> dict:
  """A stored example (bytes) → Python values; answers/meta parsed."""
  out = {name: _text(example[name]) for name in FIELDS}
  out["answers"] = json.loads(out["answers"])
  out["meta"] = json.loads(out["meta"])
  return out


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def norm(text: str) -> str:
  """SQuAD-style key normalisation: lowercase, no punctuation or articles."""
  text = _ARTICLES.sub(" ", _PUNCT.sub(" ", text.lower()))
  return " ".join(text.split())


def answer_key(answers: list[list[str]]) -> str:
  """Order-free key of a gold set: sorted entries of sorted normal aliases."""
  entries = sorted(sorted({norm(a) for a in entry}) for entry in answers)
  return json.dumps(entries)
