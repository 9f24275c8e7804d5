"""Output formats, tag strings and system prompts (METHOD §2).

Four modes: ``multi_rlcr`` and ``multi_rlvr`` ask for A candidate answers in
one generation (the paper's K; ``num_answers``), ``rlcr`` and ``rlvr`` for one.
RLCR modes add a confidence per answer and an ``<analysis>`` block.

Shape letters: A answer slots per generation.

The prompt wording is versioned by ``PROMPT_VERSION``: change the string when
the text changes, so that runs record which prompts they trained on.
"""

from __future__ import annotations

MODES = ("multi_rlcr", "multi_rlvr", "rlcr", "rlvr")
TASK_FAMILIES = ("qa", "ddx", "code")
PROMPT_VERSION = "multians-prompts-v1"

THINK = "think"
ANALYSIS = "analysis"


# Analysis text of completions this project writes itself (warm-up targets).
DEFAULT_ANALYSIS = "Several answers are possible."


def check_mode(mode: str) -> None:
  """Raises ValueError naming ``mode`` when it is not one of ``MODES``."""
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def check_family(family: str) -> None:
  """Raises ValueError naming ``family`` unless it is in ``TASK_FAMILIES``."""
  if family not in TASK_FAMILIES:
    raise ValueError(
      f"unknown family {family!r}; expected one of {TASK_FAMILIES}"
    )


def is_multi(mode: str) -> bool:
  """True for the multi-answer modes (tags ``answer1``..``answerA``)."""
  check_mode(mode)
  return mode.startswith("multi_")


def has_confidence(mode: str) -> bool:
  """True for the calibrated modes (RLCR), which carry confidences."""
  check_mode(mode)
  return mode.endswith("rlcr")


def slots(mode: str, num_answers: int) -> int:
  """Number of answer slots A: ``num_answers`` in multi modes, else 1."""
  return num_answers if is_multi(mode) else 1


def answer_tags(mode: str, num_answers: int) -> list[str]:
  """Answer tag names in slot order, e.g. ``["answer1", "answer2"]``."""
  if not is_multi(mode):
    return ["answer"]
  return [f"answer{i}" for i in range(1, num_answers + 1)]


def confidence_tags(mode: str, num_answers: int) -> list[str]:
  """Confidence tag names in slot order (empty for RLVR modes)."""
  if not has_confidence(mode):
    return []
  if not is_multi(mode):
    return ["confidence"]
  return [f"confidence{i}" for i in range(1, num_answers + 1)]


def block_orders(mode: str, num_answers: int) -> list[list[str]]:
  """Allowed orders of the tag blocks after ``<think>``.

  ``multi_rlcr`` accepts interleaved (a1 c1 a2 c2 ...) and grouped
  (a1 a2 ... c1 c2 ...) layouts; its ``<analysis>`` block may sit anywhere
  after think, so it is left out of these orders (the parser removes it
  before comparing). ``rlcr`` has the fixed order answer, analysis,
  confidence.
  """
  ans = answer_tags(mode, num_answers)
  conf = confidence_tags(mode, num_answers)
  if mode == "multi_rlcr":
    inter = [t for pair in zip(ans, conf, strict=True) for t in pair]
    grouped = ans + conf
    return [inter] if inter == grouped else [inter, grouped]
  if mode == "rlcr":
    return [ans + [ANALYSIS] + conf]
  return [ans]


def _task_line(family: str) -> str:
  return {
    "qa": "Answer the user's question.",
    "ddx": (
      "You are a clinician. Give a differential diagnosis for the patient "
      "case: each answer is one diagnosis, named as precisely as possible."
    ),
    "code": (
      "Solve the programming task. Each answer is a complete, self-contained "
      "Python function (with any imports it needs), without explanations or "
      "test code."
    ),
  }[family]


def _multi_layout(mode: str, k: int) -> str:
  parts = []
  for i in range(1, k + 1):
    parts.append(f"<answer{i}>...</answer{i}>")
    if mode == "multi_rlcr":
      parts.append(f"<confidence{i}>...</confidence{i}>")
  if mode == "multi_rlcr":
    parts.append("<analysis>...</analysis>")
  return "<think>...</think> " + " ".join(parts)


def system_prompt(mode: str, family: str, num_answers: int) -> str:
  """The system prompt for a mode, task family and number of answers A.

  Args:
    mode: one of ``MODES``.
    family: one of ``TASK_FAMILIES``.
    num_answers: A, the number of candidate answers (multi modes).

  Returns:
    Prompt text asking for A distinct answers ranked by likelihood and, in
    RLCR modes, probabilities that each answer is correct.
  """
  check_mode(mode)
  check_family(family)
  if not isinstance(num_answers, int) or num_answers < 1:
    raise ValueError(f"num_answers must be a positive int, got {num_answers!r}")
  lines = [_task_line(family)]
  lines.append(
    "First think step by step inside <think> </think> tags, then give your "
    "final answer in the format below. Put only the bare answer inside each "
    "answer tag."
  )
  if is_multi(mode):
    lines.append(
      f"Give exactly {num_answers} distinct candidate answers, ranked from "
      "most to least likely, one per tag:"
    )
    lines.append(_multi_layout(mode, num_answers))
    if mode == "multi_rlcr":
      lines.append(
        "Each confidence is your probability (a number between 0 and 1) "
        "that that answer is correct. In <analysis> explain your "
        "uncertainty."
      )
  elif mode == "rlcr":
    lines.append(
      "<think>...</think> <answer>...</answer> <analysis>...</analysis> "
      "<confidence>...</confidence>"
    )
    lines.append(
      "In <analysis> explain your uncertainty; the confidence is your "
      "probability (a number between 0 and 1) that the answer is correct."
    )
  else:
    lines.append("<think>...</think> <answer>...</answer>")
  return "\n".join(lines)


def build_messages(
  question: str,
  mode: str,
  family: str,
  num_answers: int,
  context: str | None = None,
) -> list[dict]:
  """Chat messages (system + user) for one task.

  Args:
    question: the question or task statement.
    mode: one of ``MODES``.
    family: one of ``TASK_FAMILIES``.
    num_answers: A.
    context: optional supporting text placed before the question.

  Returns:
    ``[{"role": "system", ...}, {"role": "user", ...}]``.
  """
  user = question if not context else f"{context}\n\nQuestion: {question}"
  return [
    {"role": "system", "content": system_prompt(mode, family, num_answers)},
    {"role": "user", "content": user},
  ]


def _fmt_conf(q) -> str:
  return q if isinstance(q, str) else f"{float(q):.4g}"


def format_completion(
  mode: str,
  answers,
  confidences=None,
  think: str = "...",
  analysis: str = "...",
) -> str:
  """Writes a well-formed completion (interleaved layout).

  Args:
    mode: one of ``MODES``.
    answers: A answer strings (one in single-answer modes).
    confidences: A floats (or strings, written as is) in RLCR modes.
    think: text of the ``<think>`` block (omitted when None).
    analysis: text of the ``<analysis>`` block in RLCR modes.

  Returns:
    The completion text.
  """
  check_mode(mode)
  answers = list(answers)
  if not answers:
    raise ValueError("answers must not be empty")
  if not is_multi(mode) and len(answers) != 1:
    raise ValueError(f"mode {mode!r} takes one answer, got {len(answers)}")
  conf = has_confidence(mode)
  if conf and (confidences is None or len(confidences) != len(answers)):
    raise ValueError(f"mode {mode!r} needs one confidence per answer")
  out = [] if think is None else [f"<think>{think}</think>"]
  a_tags = answer_tags(mode, len(answers))
  c_tags = confidence_tags(mode, len(answers))
  for i, (tag, ans) in enumerate(zip(a_tags, answers, strict=True)):
    out.append(f"<{tag}>{ans}</{tag}>")
    if conf and is_multi(mode):
      out.append(f"<{c_tags[i]}>{_fmt_conf(confidences[i])}</{c_tags[i]}>")
  if conf:
    out.append(f"<{ANALYSIS}>{analysis}</{ANALYSIS}>")
    if not is_multi(mode):
      out.append(f"<confidence>{_fmt_conf(confidences[0])}</confidence>")
  return "\n".join(out)
