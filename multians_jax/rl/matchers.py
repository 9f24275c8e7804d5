"""Answer matchers: which gold entry an answer names, and its key.

``MATCHERS`` is a plain table: ``exact`` (SQuAD normalisation against every
alias), ``numeric`` (numbers equal within a tolerance, else exact) and
``code`` (the candidate passes the task's tests in ``sandbox``). A
``RewardConfig.matcher`` is one of these names or a ``Matcher`` object.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import string
from collections.abc import Callable, Sequence

from multians_jax.rl import sandbox


@dataclasses.dataclass(frozen=True)
class Matcher:
  """An answer matcher. Pass your own as ``RewardConfig(matcher=Matcher(
  fn, key))`` (or ``c.reward.matcher = Matcher(...)`` in a config file).

  Attributes:
    match: ``(answer, entries, tests) -> int``, the index of the gold entry
      the answer matches, or -1. ``entries`` is a list of alias lists.
    key: ``answer -> str``, the normalised form used for distinctness.
    own_entry: every passing answer is its own entry (code): the entry id
      becomes the answer's key, so equal keys count once.
    parallel: run ``match`` calls in a thread pool (slow matchers).
  """

  match: Callable[[str, Sequence[Sequence[str]], str | None], int]
  key: Callable[[str], str] = None  # type: ignore[assignment]
  own_entry: bool = False
  parallel: bool = False

  def __post_init__(self):
    if not callable(self.match):
      raise ValueError(f"matcher: match is not callable: {self.match!r}")
    if self.key is None:  # SQuAD normalisation
      object.__setattr__(self, "key", normalize_answer)
    if not callable(self.key):
      raise ValueError(f"matcher: key is not callable: {self.key!r}")


_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@functools.lru_cache(maxsize=1 << 16)
def normalize_answer(s: str) -> str:
  """SQuAD normalisation: lowercase, drop punctuation and articles, spaces."""
  s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
  return " ".join(_ARTICLES.sub(" ", s).split())


@functools.lru_cache(maxsize=1 << 12)
def _alias_index(entries: tuple) -> dict[str, int]:
  index = {}
  for e, aliases in enumerate(entries):
    for alias in aliases:
      index.setdefault(normalize_answer(str(alias)), e)
  return index


def _freeze(entries) -> tuple:
  return tuple(tuple(str(a) for a in aliases) for aliases in entries)


def exact_match(answer: str, entries, tests=None) -> int:
  """Entry whose normalised alias equals the normalised answer, else -1."""
  del tests
  key = normalize_answer(answer)
  return _alias_index(_freeze(entries)).get(key, -1) if key else -1


_NUM_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_FRAC_RE = re.compile(r"([-+]?\d+)\s*/\s*(\d+)")


def parse_number(s: str) -> float | None:
  """A number from ``s``: thousands separators, simple fractions, else the
  last number in the text; None when there is none."""
  t = s.strip().replace(",", "").replace("$", "").rstrip(".").strip()
  if len(t) > 256:
    return None
  frac = _FRAC_RE.fullmatch(t)
  if frac:
    den = int(frac.group(2))
    return int(frac.group(1)) / den if den else None
  found = _NUM_RE.findall(t)
  if not found:
    return None
  v = float(found[-1])
  return v if math.isfinite(v) else None


def numeric_match(answer: str, entries, tests=None, rel_tol=1e-6) -> int:
  """Entry with an alias numerically equal to the answer (tolerance), else
  the exact match for non-numeric text."""
  del tests
  v = parse_number(answer)
  if v is None:
    return exact_match(answer, entries)
  for e, aliases in enumerate(entries):
    for alias in aliases:
      g = parse_number(str(alias))
      if g is not None and math.isclose(v, g, rel_tol=rel_tol, abs_tol=1e-9):
        return e
  return -1


def numeric_key(answer: str) -> str:
  """Canonical number text (``1,000`` and ``1000.0`` share a key)."""
  v = parse_number(answer)
  return normalize_answer(answer) if v is None else repr(float(v))


MATCHERS: dict[str, Matcher] = {
  "exact": Matcher(exact_match, normalize_answer),
  "numeric": Matcher(numeric_match, numeric_key),
  "code": Matcher(  # the candidate runs against the task's tests
    sandbox.code_match, sandbox.code_key, own_entry=True, parallel=True
  ),
}


def get(matcher: str | Matcher) -> Matcher:
  """A matcher by name (``MATCHERS``), or the given ``Matcher`` itself;
  ValueError naming an unknown one."""
  if isinstance(matcher, Matcher):
    return matcher
  if not isinstance(matcher, str) or matcher not in MATCHERS:
    raise ValueError(
      f"unknown matcher {matcher!r}: one of {sorted(MATCHERS)} or a "
      "matchers.Matcher"
    )
  return MATCHERS[matcher]
