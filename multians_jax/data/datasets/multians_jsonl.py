"""``multians_jsonl``: a user's own data in the METHOD §7 JSONL schema.

One JSON object per line::

  {"id": "...", "question": "...", "answers": [["alias", "alias"], ["b"]],
   "context": "optional", "tests": "optional", "meta": {}, "family": "qa"}

``family`` (``qa`` | ``ddx`` | ``code``) is optional (default ``qa``, or the
builder's ``family`` argument). Every line is validated before anything is
written; errors name the file and line (bad JSON, missing ``answers``, an
empty alias list, ...).

Input files, either given as ``jsonl=`` to the builder or found in the TFDS
manual dir (``*.jsonl``):

- a file whose name starts with ``train``, ``test`` or ``validation`` goes to
  that split as is (a user's DDXPlus or MBPP export keeps its official
  split; answer sets such as DDXPlus differentials legitimately repeat
  across its splits);
- files without such a prefix are pooled and split 80/20 by
  ``splits.assign`` (no question or answer set in both splits).

``jsonl=`` may also be a dict ``{split_name: [paths]}``.
"""

import os

from multians_jax.data.datasets import base, schema, splits

_DESCRIPTION = __doc__
_SPLIT_PREFIXES = ("train", "test", "validation")


def _split_of(path: str) -> str | None:
  stem = os.path.basename(path).lower()
  return next((s for s in _SPLIT_PREFIXES if stem.startswith(s)), None)


def group_files(paths) -> dict[str | None, list[str]]:
  """{split name or None (pool): [paths]} from paths or a dict of them."""
  if isinstance(paths, dict):
    return {k: [os.fspath(p) for p in v] for k, v in paths.items()}
  if isinstance(paths, str | os.PathLike):
    paths = [paths]
  grouped = {}
  for p in sorted(os.fspath(p) for p in paths):
    grouped.setdefault(_split_of(p), []).append(p)
  return grouped


class MultiansJsonl(base.RecordBuilder):
  """Records from local JSONL files in the project schema."""

  name = "multians_jsonl"
  DESCRIPTION = _DESCRIPTION
  CITATION = ""
  LICENSE = "Whatever licence the user's source data carries."
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Place *.jsonl files in the METHOD §7 schema in the manual dir (names "
    "starting with train/test/validation select the split), or pass "
    "jsonl=[paths] to the builder."
  )

  def __init__(self, *, jsonl=None, family: str = "qa", **kwargs):
    super().__init__(**kwargs)
    self._jsonl = jsonl
    self._family = family

  def _input_files(self, dl_manager):
    if self._jsonl is not None:
      return group_files(self._jsonl)
    manual = os.fspath(dl_manager.manual_dir)
    files = [
      os.path.join(manual, f)
      for f in os.listdir(manual)
      if f.endswith(".jsonl")
    ]
    if not files:
      raise FileNotFoundError(f"no *.jsonl files in manual dir {manual}")
    return group_files(files)

  def _records(self, dl_manager) -> dict[str, list[dict]]:
    out = {}
    for split, files in self._input_files(dl_manager).items():
      records = []
      for path in files:
        records.extend(schema.read_jsonl(path, self._family))
      if split is None:
        for name, recs in splits.assign(records, 0.2, salt=self.name).items():
          out.setdefault(name, []).extend(recs)
      else:
        out.setdefault(split, []).extend(records)
    return out
