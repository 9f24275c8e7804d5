"""Output formats and system prompts."""

import os

import pytest

from multians_jax.data import prompts
from multians_jax.rl import parsing, reward

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("mode", prompts.MODES)
@pytest.mark.parametrize("family", prompts.TASK_FAMILIES)
def test_system_prompt_names_every_tag(mode, family):
  text = prompts.system_prompt(mode, family, 4)
  for tag in prompts.answer_tags(mode, 4) + prompts.confidence_tags(mode, 4):
    assert f"<{tag}>" in text and f"</{tag}>" in text
  assert "<think>" in text
  assert ("<analysis>" in text) == prompts.has_confidence(mode)
  assert ("exactly 4 distinct" in text) == prompts.is_multi(mode)
  assert ("probability" in text) == prompts.has_confidence(mode)


def test_tags_and_orders():
  assert prompts.answer_tags("multi_rlvr", 2) == ["answer1", "answer2"]
  assert prompts.confidence_tags("rlcr", 3) == ["confidence"]
  assert prompts.confidence_tags("multi_rlvr", 3) == []
  assert prompts.block_orders("multi_rlcr", 2) == [
    ["answer1", "confidence1", "answer2", "confidence2"],
    ["answer1", "answer2", "confidence1", "confidence2"],
  ]
  rlcr = prompts.block_orders("rlcr", 1)
  assert rlcr == [["answer", "analysis", "confidence"]]
  assert prompts.slots("rlvr", 5) == 1 and prompts.slots("multi_rlvr", 5) == 5


def test_build_messages_with_context():
  msgs = prompts.build_messages("Who?", "rlvr", "qa", 1, context="Doc text.")
  assert [m["role"] for m in msgs] == ["system", "user"]
  assert msgs[0]["content"] == prompts.system_prompt("rlvr", "qa", 1)
  assert msgs[1]["content"] == "Doc text.\n\nQuestion: Who?"
  assert prompts.build_messages("Q", "rlvr", "qa", 1)[1]["content"] == "Q"


@pytest.mark.parametrize(
  "call,name",
  [
    (lambda: prompts.system_prompt("multi", "qa", 3), "multi"),
    (lambda: prompts.system_prompt("rlvr", "math", 3), "math"),
    (lambda: prompts.system_prompt("rlvr", "qa", 0), "num_answers"),
    (lambda: prompts.build_messages("q", "x", "qa", 1), "'x'"),
    (lambda: prompts.format_completion("rlcr", ["a"]), "confidence"),
    (lambda: prompts.format_completion("rlvr", ["a", "b"]), "one answer"),
    (lambda: prompts.format_completion("bad", ["a"]), "bad"),
  ],
)
def test_errors_name_the_problem(call, name):
  with pytest.raises(ValueError, match=name):
    call()


@pytest.mark.parametrize("mode", prompts.MODES)
def test_format_completion_parses(mode):
  k = 3 if prompts.is_multi(mode) else 1
  answers = ["x", "y", "z"][:k]
  text = prompts.format_completion(mode, answers, [0.1] * k)
  parsed = parsing.parse(text, reward.RewardConfig(mode=mode, num_answers=k))
  assert parsed.format_ok and parsed.answers == tuple(answers)
