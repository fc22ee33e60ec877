"""Incremental detokenisation: stable text only, the full decode in the end, a bounded cost."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from services.inference_gateway.engines.base import SamplingParams
from services.inference_gateway.engines.decoding import Generation, IncrementalDetokenizer

TEXT = ("Fortune favours the bold. 好运眷顾勇敢的人。幸運は勇者に味方する。"
        "행운은 용감한 자의 편이다 🍀🎲 — naïve café, ½ price! ")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on English only: CJK characters and emoji are split
    into byte tokens, most of which end inside a UTF-8 character."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["the bold man favours fortune; a fortune for the weary"] * 50,
                            trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


class CountingTokenizer:
    """Records how many tokens each decode call was given."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer = tokenizer
        self.decoded: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        self.decoded.append(len(token_ids))
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def test_cjk_and_emoji_come_out_whole_and_add_up_to_the_full_decode(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT)  # byte tokens: many end inside a character
    assert "\ufffd" in tokenizer.decode(ids[:20])  # a plain prefix decode breaks one
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(token) for token in ids]
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece) > 20  # text flows as it becomes stable
    assert "".join(pieces) + detokenizer.flush() == tokenizer.decode(ids) == TEXT


def test_each_step_decodes_a_few_tokens_however_long_the_output(tokenizer):
    counting = CountingTokenizer(tokenizer)
    ids = tokenizer.encode(TEXT * 40, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(counting)
    text = "".join(detokenizer.add(token) for token in ids) + detokenizer.flush()
    assert text == TEXT * 40 and len(ids) > 3000
    # The window is the last release and what is not released yet (at most one
    # character's bytes here), not the output so far.
    assert max(counting.decoded) <= 8
    assert sum(counting.decoded) < 10 * len(ids)


def test_an_unfinished_character_at_the_end_is_flushed_as_the_full_decode_has_it(tokenizer):
    ids = tokenizer.encode("ok 好", add_special_tokens=False)[:-1]  # drop the last byte
    detokenizer = IncrementalDetokenizer(tokenizer)
    released = "".join(detokenizer.add(token) for token in ids)
    assert "\ufffd" not in released
    assert released + detokenizer.flush() == tokenizer.decode(ids)


def test_a_generation_ends_at_eos_or_its_budget_with_the_text_held_back(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = tokenizer.encode("好运", add_special_tokens=False)

    def run(tokens: list[int], max_new_tokens: int) -> list:
        generation = Generation(tokenizer, SamplingParams(max_new_tokens=max_new_tokens),
                                prompt_tokens=3, eos_token_id=eos, context_length=64)
        pieces = []
        for token in tokens:
            piece = generation.add(token)
            if piece is not None:
                pieces.append(piece)
                if piece.finish_reason:
                    break
        return pieces

    to_eos = run([*ids, eos], max_new_tokens=50)
    assert "".join(p.text for p in to_eos) == "好运"
    assert (to_eos[-1].finish_reason, to_eos[-1].completion_tokens,
            to_eos[-1].prompt_tokens) == ("eos", len(ids), 3)
    cut = run(ids, max_new_tokens=2)  # stops inside 好: the full decode of two tokens
    assert (cut[-1].finish_reason, cut[-1].completion_tokens) == ("length", 2)
    assert "".join(p.text for p in cut) == tokenizer.decode(ids[:2])
