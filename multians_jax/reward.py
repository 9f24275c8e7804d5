"""Parse, normalise and match on host; the set-reward kernel on device.

SPEC §2-§4. Host code turns completion strings into arrays (``parse`` →
matcher ``key`` / ``match``); ``set_reward_kernel`` computes every reward
component for the whole batch at once. ``score_texts`` chains both.

Shape letters: B completions, A answer slots (the paper's K; 1 in the
single-answer modes ``rlcr`` / ``rlvr``).

Symbols (SPEC §3): c_i correct, e_i matched entry id (-1 none),
D = |{e_i : e_i >= 0}| distinct correct, f format flag, u distinctness flag,
q_i confidences (missing read as 0), B = (1/A) Σ_i (q_i - c_i)².
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import re
import string
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from multians_jax import prompts

CORRECTNESS = ("count", "count_over_k", "any")
PRESETS = ("paper", "reference")
# Σq > 1 + SUM_TOL trips the ``confidence_sum_le_one`` gate; the tolerance
# absorbs float32 rounding of confidences that sum to exactly one.
SUM_TOL = 1e-5


# The paper's reward (arXiv 2603.24844): r_acc = D, R = r_acc - B, Σq <= 1
# gate. RewardConfig's defaults are the training defaults (configs/base.py:
# the reference code's ``any`` / ``reference``, no Σq gate);
# ``RewardConfig(**PAPER)`` is the paper's.
PAPER = dict(correctness="count", preset="paper", confidence_sum_le_one=True)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """Reward settings (SPEC §3); the defaults are training's (``PAPER``).

  Attributes:
    mode: output format, one of ``prompts.MODES``.
    num_answers: K answers per generation in the multi modes.
    correctness: r_acc = D (``count``, paper), D/K (``count_over_k``) or
      1[D >= 1] (``any``, the reference code's default).
    preset: ``paper`` (R = r_acc - B, format failure gives
      ``format_penalty``) or ``reference`` (R = w_f f + w_a r_acc +
      w_b (1 - B)).
    require_distinct: in ``multi_rlcr``, duplicate answers (after
      normalisation) zero r_acc and disable the Brier term. Has no effect on
      ``multi_rlvr``, where duplicates simply add nothing to D.
    confidence_sum_le_one: disable the Brier term when Σq > 1. Only right
      for single-truth tasks: when answers are not mutually exclusive the
      true marginals p_i can sum above one, and this gate then breaks the
      properness of the Multi-RLCR reward (honest q = p is punished).
    require_think: the ``<think>`` block must come first.
    accept_percent: read ``70%`` as 0.7.
    format_penalty: total reward of a format failure in the ``paper``
      preset.
    weights: (w_f, w_a, w_b) of the ``reference`` preset.
    matcher: name of a registered matcher (``exact``, ``numeric``,
      ``code`` or one added with ``register_matcher``).
  """

  mode: str = "multi_rlcr"
  num_answers: int = 3
  correctness: str = "any"
  preset: str = "reference"
  require_distinct: bool = True
  confidence_sum_le_one: bool = False
  require_think: bool = True
  accept_percent: bool = False
  format_penalty: float = 0.0
  weights: tuple = (0.5, 0.5, 0.5)
  matcher: str = "exact"

  def __post_init__(self):
    _check_choice("mode", self.mode, prompts.MODES)
    _check_choice("correctness", self.correctness, CORRECTNESS)
    _check_choice("preset", self.preset, PRESETS)
    if not isinstance(self.num_answers, int) or self.num_answers < 1:
      raise ValueError(f"num_answers must be an int >= 1: {self.num_answers}")
    for name in _BOOL_FIELDS:
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be a bool: {getattr(self, name)!r}")
    if not math.isfinite(float(self.format_penalty)):
      raise ValueError(f"format_penalty must be finite: {self.format_penalty}")
    w = tuple(float(x) for x in self.weights)
    if len(w) != 3 or not all(math.isfinite(x) for x in w):
      raise ValueError(f"weights must be 3 finite floats: {self.weights}")
    object.__setattr__(self, "weights", w)
    if not isinstance(self.matcher, str) or not self.matcher:
      raise ValueError(f"matcher must be a non-empty name: {self.matcher!r}")

  @property
  def slots(self) -> int:
    """A: answer slots per completion (K, or 1 in single-answer modes)."""
    return prompts.slots(self.mode, self.num_answers)

  def kernel_kwargs(self) -> dict:
    """Keyword arguments of ``set_reward_kernel`` for this config."""
    return dict(
      mode=self.mode,
      correctness=self.correctness,
      preset=self.preset,
      require_distinct=self.require_distinct,
      confidence_sum_le_one=self.confidence_sum_le_one,
      format_penalty=float(self.format_penalty),
      weights=self.weights,
    )


_BOOL_FIELDS = (
  "require_distinct",
  "confidence_sum_le_one",
  "require_think",
  "accept_percent",
)


def _check_choice(field: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{field} must be one of {choices}, got {value!r}")


# ----------------------------------------------------------------- parsing


@dataclasses.dataclass(frozen=True)
class Parsed:
  """One parsed completion.

  Attributes:
    answers: A answer strings, stripped; None where the tag is missing.
    confidences: A floats; NaN where missing or invalid.
    format_ok: f, the strict format check of SPEC §2.
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


def parse(text, cfg: RewardConfig) -> Parsed:
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


# ---------------------------------------------------------------- matchers


@dataclasses.dataclass(frozen=True)
class Matcher:
  """A named answer matcher.

  Attributes:
    match: ``(answer, entries, tests) -> int``, the index of the gold entry
      the answer matches, or -1. ``entries`` is a list of alias lists.
    key: ``answer -> str``, the normalised form used for distinctness.
    own_entry: every passing answer is its own entry (code): the entry id
      becomes the answer's key, so equal keys count once.
    parallel: run ``match`` calls in a thread pool (slow matchers).
  """

  match: Callable[[str, Sequence[Sequence[str]], str | None], int]
  key: Callable[[str], str]
  own_entry: bool = False
  parallel: bool = False


_MATCHERS: dict[str, Matcher] = {}


def register_matcher(
  name: str,
  fn: Callable[[str, Sequence[Sequence[str]], str | None], int],
  *,
  key: Callable[[str], str] | None = None,
  own_entry: bool = False,
  parallel: bool = False,
) -> None:
  """Registers ``fn`` as matcher ``name`` (see ``Matcher``).

  ``key`` defaults to SQuAD normalisation (``normalize_answer``).
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"matcher name must be a non-empty string: {name!r}")
  if not callable(fn):
    raise ValueError(f"matcher {name!r}: fn is not callable")
  _MATCHERS[name] = Matcher(fn, key or normalize_answer, own_entry, parallel)


def get_matcher(name: str) -> Matcher:
  """The matcher registered as ``name``; ValueError naming it otherwise."""
  if name not in _MATCHERS and name == "code":
    from multians_jax import sandbox  # noqa: F401  (registers "code")
  if name not in _MATCHERS:
    raise ValueError(f"unknown matcher {name!r}; have {sorted(_MATCHERS)}")
  return _MATCHERS[name]


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


register_matcher("exact", exact_match)
register_matcher("numeric", numeric_match, key=numeric_key)


# ------------------------------------------------------------------ kernel


@functools.partial(jax.jit, static_argnames=("mode", "correctness", "preset"))
def set_reward_kernel(
  entry_ids,
  answer_keys,
  confidences,
  format_ok,
  *,
  mode: str,
  correctness: str = "count",
  preset: str = "paper",
  require_distinct=True,
  confidence_sum_le_one=True,
  format_penalty=0.0,
  weights=(0.5, 0.5, 0.5),
) -> dict:
  """Every SPEC §3 reward component for a batch, vectorised.

  ``mode``, ``correctness`` and ``preset`` are static (they change the
  computation); the gates, penalty and weights are traced, so changing them
  does not recompile.

  Args:
    entry_ids: int [B, A], matched gold entry e_i (-1 none).
    answer_keys: int [B, A], ids of normalised answers (equal id = equal
      answer) for the distinctness flag u.
    confidences: float [B, A], q_i; NaN where missing (read as 0).
    format_ok: bool [B], f.
    mode: one of ``prompts.MODES``.
    correctness: ``count``, ``count_over_k`` or ``any``.
    preset: ``paper`` or ``reference``.
    require_distinct: bool scalar, see ``RewardConfig``.
    confidence_sum_le_one: bool scalar, see ``RewardConfig``.
    format_penalty: paper-preset total of a format failure.
    weights: (w_f, w_a, w_b) of the reference preset.

  Returns:
    Dict of [B] arrays: ``total``, ``format_ok``, ``distinct`` (u),
    ``num_correct`` (D), ``acc`` (gated r_acc), ``acc_gated``, ``brier`` (B,
    NaN in RLVR modes), ``brier_gated`` (1 when the Brier term is disabled),
    ``sum_exceeded``, ``conf_sum``, ``decomposable``; and [B, A]
    ``correct``, ``confidence`` and ``slot`` (each slot's own part of the
    total, see ``_slot_parts``).
  """
  a = entry_ids.shape[-1]
  f = format_ok.astype(bool)
  c = entry_ids >= 0
  earlier = jnp.tril(jnp.ones((a, a), bool), -1)  # [i, j]: j < i
  same_entry = entry_ids[:, :, None] == entry_ids[:, None, :]
  first = c & ~jnp.any(same_entry & earlier, axis=-1)
  d = first.sum(-1).astype(jnp.float32)
  same_key = answer_keys[:, :, None] == answer_keys[:, None, :]
  u = ~jnp.any(same_key & earlier, axis=(-2, -1))
  q = jnp.where(jnp.isnan(confidences), 0.0, confidences).astype(jnp.float32)
  conf_sum = q.sum(-1)
  brier = jnp.mean((q - c.astype(jnp.float32)) ** 2, axis=-1)

  r_acc = {"count": d, "count_over_k": d / a, "any": (d >= 1) * 1.0}
  require_distinct = jnp.asarray(require_distinct, bool)
  acc_gated = ~f
  if mode == "multi_rlcr":
    acc_gated = acc_gated | (require_distinct & ~u)
  acc = jnp.where(acc_gated, 0.0, r_acc[correctness])

  calibrated = prompts.has_confidence(mode)
  sum_exceeded = conf_sum > 1.0 + SUM_TOL
  brier_gated = (
    ~f
    | (require_distinct & ~u)
    | (jnp.asarray(confidence_sum_le_one, bool) & sum_exceeded)
  )
  if not calibrated:
    brier_gated = jnp.ones_like(f)
    brier = jnp.full_like(brier, jnp.nan)

  if preset == "paper":
    total = acc - jnp.where(brier_gated, 1.0, brier) if calibrated else acc
    total = jnp.where(f, total, format_penalty)
  else:
    w_f, w_a, w_b = weights
    total = w_f * f + w_a * acc
    if calibrated:
      total = total + jnp.where(brier_gated, 0.0, w_b * (1.0 - brier))
  slot, decomposable = _slot_parts(
    first, c, q, acc_gated, brier_gated, f, total,
    a=a, correctness=correctness, preset=preset, calibrated=calibrated,
    weights=weights,
  )  # fmt: skip
  flt = lambda x: x.astype(jnp.float32)
  return dict(
    total=flt(total),
    slot=flt(slot),
    decomposable=flt(decomposable),
    format_ok=flt(f),
    distinct=flt(u),
    num_correct=d,
    acc=flt(acc),
    acc_gated=flt(acc_gated),
    brier=flt(brier),
    brier_gated=flt(brier_gated),
    sum_exceeded=flt(sum_exceeded),
    conf_sum=conf_sum,
    correct=flt(c),
    confidence=q,
  )


def _slot_parts(
  first, c, q, acc_gated, brier_gated, f, total, *, a, correctness, preset,
  calibrated, weights,
):  # fmt: skip
  """Each answer slot's own part of the total (per-answer credit, SPEC §10).

  ``slot`` [B, A] is slot i's correctness term (``first_i`` for ``count``,
  ``first_i / A`` for ``count_over_k``; times w_a under ``reference``) plus
  its share of the Brier term (``-(q_i - c_i)^2 / A`` under ``paper``,
  ``w_b (1 - (q_i - c_i)^2) / A`` under ``reference``) on the completions
  whose reward decomposes: format valid and no gate tripped
  (``decomposable``). On the others the reward is one event of the whole
  sequence; it is split evenly between the slots so that every row's parts
  add up the same way (the group baselines of ``advantage.slot_advantages``
  read them; those rows' tokens keep the sequence advantage). For every
  row, total = shared + Σ_i slot_i, with shared = w_f f under
  ``reference`` and 0 under ``paper``. ``any`` is not additive (one correct
  slot makes the others worthless): no row decomposes.
  """
  if preset == "paper":
    shared = jnp.zeros(f.shape, jnp.float32)
  else:
    shared = weights[0] * f.astype(jnp.float32)
  even = jnp.broadcast_to(((total - shared) / a)[:, None], first.shape)
  if correctness == "any":
    return even, jnp.zeros(f.shape, bool)
  acc = first.astype(jnp.float32)
  if correctness == "count_over_k":
    acc = acc / a
  sq = (q - c.astype(jnp.float32)) ** 2 / a
  if preset == "paper":
    part = acc - sq if calibrated else acc
  else:
    _, w_a, w_b = weights
    part = w_a * acc + (w_b * (1.0 / a - sq) if calibrated else 0.0)
  ok = f & ~acc_gated & (~brier_gated if calibrated else True)
  return jnp.where(ok[:, None], part, even), ok


# ------------------------------------------------------------- host driver


def _bucket(n: int) -> int:
  """Pads the batch to a power of two (>= 8) so compiles stay few."""
  return max(8, 1 << (max(n, 1) - 1).bit_length())


def _match_all(matcher, answers, gold, tests) -> list[int]:
  """Entry index per (completion, slot) pair; -1 for missing answers."""
  jobs = [
    (ans, gold[b], None if tests is None else tests[b])
    for b, row in enumerate(answers)
    for ans in row
  ]
  run = lambda j: -1 if not j[0] else int(matcher.match(*j))
  if not matcher.parallel:
    return [run(j) for j in jobs]
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
    return list(pool.map(run, jobs))


def encode(parsed: Sequence[Parsed], gold, cfg, tests=None) -> dict:
  """Host arrays for the kernel from parsed completions.

  Returns:
    Dict with ``entry_ids``, ``answer_keys`` (int32 [B, A]; keys are
    batch-global ids of normalised answers, -1 for a missing answer),
    ``confidences`` (float32 [B, A]) and ``format_ok`` (bool [B]).
  """
  matcher = get_matcher(cfg.matcher)
  answers = [p.answers for p in parsed]
  ids = np.array(_match_all(matcher, answers, gold, tests), np.int32)
  ids = ids.reshape(len(parsed), cfg.slots)
  key_ids: dict[str, int] = {}
  keys = np.array(
    [
      -1 if not ans else key_ids.setdefault(matcher.key(ans), len(key_ids))
      for row in answers
      for ans in row
    ],
    np.int32,
  ).reshape(ids.shape)
  if matcher.own_entry:
    ids = np.where(ids >= 0, keys, -1).astype(np.int32)
  return dict(
    entry_ids=ids,
    answer_keys=keys,
    confidences=np.array([p.confidences for p in parsed], np.float32),
    format_ok=np.array([p.format_ok for p in parsed], bool),
  )


def score_texts(texts, gold, cfg: RewardConfig, tests=None) -> dict:
  """Parses, matches and scores completions (SPEC §3).

  Args:
    texts: B completion strings.
    gold: B gold sets; ``gold[b]`` is a list of entries, each a list of
      alias strings.
    cfg: reward settings.
    tests: optional B test strings (``code`` matcher).

  Returns:
    Dict of numpy arrays: the kernel outputs (see ``set_reward_kernel``)
    plus ``entry_id`` and ``answer_key`` [B, A].
  """
  texts = list(texts)
  if len(gold) != len(texts):
    raise ValueError(f"gold has {len(gold)} rows for {len(texts)} texts")
  if tests is not None and len(tests) != len(texts):
    raise ValueError(f"tests has {len(tests)} rows for {len(texts)} texts")
  enc = encode([parse(t, cfg) for t in texts], gold, cfg, tests)
  n, pad = len(texts), _bucket(len(texts)) - len(texts)
  padded = [
    np.pad(enc[k], [(0, pad)] + [(0, 0)] * (enc[k].ndim - 1))
    for k in ("entry_ids", "answer_keys", "confidences", "format_ok")
  ]
  out = set_reward_kernel(*padded, **cfg.kernel_kwargs())
  result = {k: np.asarray(v)[:n] for k, v in out.items()}
  result["entry_id"] = enc["entry_ids"]
  result["answer_key"] = enc["answer_keys"]
  return result
