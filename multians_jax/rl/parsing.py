"""Completion parsing: the strict output format of the multi-answer modes.

``parse(text, cfg)`` reads the ``<think>`` block, the K ``<answerI>`` and
``<confidenceI>`` tags (or the single-answer ones) and checks the format;
``cfg`` is a ``reward.RewardConfig`` (its ``mode``, ``slots``,
``require_think`` and ``accept_percent``).
"""

from __future__ import annotations

import dataclasses
import math
import re

from multians_jax.data import prompts


@dataclasses.dataclass(frozen=True)
class Parsed:
  """One parsed completion.

  Attributes:
    answers: A answer strings, stripped; None where the tag is missing.
    confidences: A floats; NaN where missing or invalid.
    format_ok: f, the strict format check of METHOD §2.
    error: why the format check failed ('' when it passed).
  """

  answers: tuple
  confidences: tuple
  format_ok: bool
  error: str = ""


_TAG_RE = re.compile(r"<(/?)(think|analysis|answer|confidence)(\d*)>")
_FLOAT_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def parse_confidence(text: str | None, accept_percent: bool) -> float:
  """A confidence in [0, 1], or NaN when ``text`` is not a valid one."""
  if text is None:
    return math.nan
  s = text.strip()
  scale = 1.0
  if accept_percent and s.endswith("%"):
    s, scale = s[:-1].rstrip(), 0.01
  if len(s) > 64 or not _FLOAT_RE.fullmatch(s):
    return math.nan
  v = float(s) * scale
  return v if 0.0 <= v <= 1.0 else math.nan


def _tags(text: str) -> list[tuple[bool, str, int, int]]:
  return [
    (m.group(1) == "/", m.group(2) + m.group(3), m.start(), m.end())
    for m in _TAG_RE.finditer(text)
  ]


def _extract(text: str, tags, name: str) -> str | None:
  """Content of the first ``<name>...</name>`` pair, leniently."""
  start = None
  for closing, tag, s, e in tags:
    if tag != name:
      continue
    if not closing and start is None:
      start = e
    elif closing and start is not None:
      return text[start:s].strip()
  return None


def _blocks(text: str, tags) -> tuple[list[str], str]:
  """Block names when tags form open/close pairs separated by whitespace."""
  if len(tags) % 2:
    return [], "unbalanced tags"
  names, prev_end = [], 0
  for j in range(0, len(tags), 2):
    (c1, n1, s1, _), (c2, n2, _, e2) = tags[j], tags[j + 1]
    if c1 or not c2 or n1 != n2:
      return [], f"tag <{n1}> not closed before <{'/' if c2 else ''}{n2}>"
    if text[prev_end:s1].strip():
      return [], f"text outside tags before <{n1}>"
    names.append(n1)
    prev_end = e2
  if text[prev_end:].strip():
    return [], "text outside tags at the end"
  return names, ""


def _order_error(names: list[str], text: str, tags, cfg) -> str:
  if names and names[0] == prompts.THINK:
    if not text[tags[0][3] : tags[1][2]].strip():
      return "empty <think>"
    names = names[1:]
  elif cfg.require_think:
    return "missing <think> first"
  if cfg.mode == "multi_rlcr":
    if names.count(prompts.ANALYSIS) != 1:
      return "<analysis> must appear once"
    names = [n for n in names if n != prompts.ANALYSIS]
  if names not in prompts.block_orders(cfg.mode, cfg.num_answers):
    return f"tags out of order or missing: {names[:12]}"
  return ""


def parse(text, cfg) -> Parsed:
  """Parses one completion (never raises; non-strings parse as invalid).

  Args:
    text: the completion text.
    cfg: reward settings (mode, K, ``require_think``, ``accept_percent``).

  Returns:
    ``Parsed`` with answers and confidences extracted leniently and the
    strict format flag f.
  """
  if not isinstance(text, str):
    text = ""
  tags = _tags(text)
  a_tags = prompts.answer_tags(cfg.mode, cfg.num_answers)
  c_tags = prompts.confidence_tags(cfg.mode, cfg.num_answers)
  answers = tuple(_extract(text, tags, t) for t in a_tags)
  confs = tuple(
    parse_confidence(_extract(text, tags, t), cfg.accept_percent)
    for t in c_tags
  ) or (math.nan,) * len(a_tags)
  names, error = _blocks(text, tags)
  if not error:
    error = _order_error(names, text, tags, cfg)
  if not error and any(not a for a in answers):
    error = "empty answer"
  if not error and c_tags and any(math.isnan(q) for q in confs):
    error = "invalid confidence"
  return Parsed(answers, confs, not error, error)
