from __future__ import annotations

import json

import pytest

from lmforge.modeling import load_token_stream, load_tokenizer
from services.data_prep.cleaning import normalize_text
from services.data_prep.prepare import PrepConfig, prepare_dataset
from services.data_prep.sources import DatasetInputError

MIXED = [
    "机器学习是人工智能的一个分支。它使计算机能够从数据中学习，而无需明确编程。",
    "深度学习使用多层神经网络。今天天气很好，我们去公园散步吧！",
    "Mixed text: 我们的模型 runs on-prem, 数据不出门 — naïve café 😀.",
    "日本語も少し：東京は大きい都市です。한국어 문장도 있습니다.",
    "The quick brown fox jumps over the lazy dog.",
] * 3 + [f"Document number {i}: 第{i}个文档，内容各不相同。" for i in range(60)]


def test_cjk_and_mixed_text_round_trips_through_the_tokenizer(tmp_path):
    source = tmp_path / "mixed.jsonl"
    source.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in MIXED))
    stats = prepare_dataset(source, "jsonl", "text", tmp_path / "out",
                            PrepConfig.hygiene_only(vocab_size=600, seq_len=32,
                                                            heldout_fraction=0.1))
    assert stats.duplicates_dropped == 10
    assert stats.records_kept == 65
    tokenizer = load_tokenizer(tmp_path / "out" / "tokenizer")
    for text in [*MIXED[:5], "全新的句子，从未见过：量子计算🚀"]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == normalize_text(text)
    tokens = load_token_stream(tmp_path / "out", "train")
    assert len(tokens) == stats.train_tokens > 0
    assert tokens.max() < stats.vocab_size


def test_split_is_stable_and_dedup_is_exact(tmp_path):
    source = tmp_path / "d.txt"
    docs = [f"fortune number {i} says something unique" for i in range(200)]
    source.write_text("\n%\n".join(docs + docs[:20] + ["   ", ""]) + "\n")
    config = PrepConfig.hygiene_only(vocab_size=300, seq_len=16)
    first = prepare_dataset(source, "text", "", tmp_path / "a", config)
    second = prepare_dataset(source, "text", "", tmp_path / "b", config)
    assert first.duplicates_dropped == 20
    assert first.heldout_documents == second.heldout_documents > 0
    a = load_token_stream(tmp_path / "a", "heldout")
    b = load_token_stream(tmp_path / "b", "heldout")
    assert (a == b).all()


@pytest.mark.parametrize("content", [b"", b"\n\n%\n   \n", b"\xff\xfe\xfd\n\n\xc3\x28\n"])
def test_dataset_without_usable_text_is_a_clear_error(tmp_path, content):
    source = tmp_path / "empty.txt"
    source.write_bytes(content)
    with pytest.raises(DatasetInputError, match="no usable documents"):
        prepare_dataset(source, "text", "", tmp_path / "out", PrepConfig())
