"""Chat data in data-prep: conversations (messages, or prompt + response) rendered with a
chat template, the loss mask on assistant tokens only (checked token by token), and the
filters, PII scrub and dedup applied to the message text."""

from __future__ import annotations

import json

import pytest

from lmforge.base_models import CHAT_TEMPLATE_FILE, inspect_base_model
from lmforge.modeling import load_loss_mask, load_token_stream, load_tokenizer
from services.data_prep.chat import ChatRenderer
from services.data_prep.near_dup import NearDupConfig
from services.data_prep.packing import ShardWriter
from services.data_prep.pii import PiiConfig
from services.data_prep.prepare import PrepConfig, prepare_dataset
from services.data_prep.sources import DatasetInputError
from tests.base_model_fixtures import save_base_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris, on the Seine."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.fixture(scope="module")
def chatml_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chatml-tokenizer")
    save_base_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def base(base_models):
    return inspect_base_model(str(base_models["llama"]), [base_models["llama"].parent])


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _conversations(n):
    return [{"messages": [{"role": "user", "content": f"Question number {i}: what follows {i}?"},
                          {"role": "assistant", "content": f"The number {i + 1} follows {i}."}]}
            for i in range(n)]


def test_loss_mask_is_one_exactly_on_assistant_tokens_token_by_token(chatml_tokenizer):
    from tests.base_model_fixtures import CHATML_TEMPLATE

    renderer = ChatRenderer(chatml_tokenizer, CHATML_TEMPLATE)
    rendered = renderer.render(CONVERSATION)
    expected_text = (
        "<|im_start|>system\nAnswer in one line.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis, on the Seine.<|im_end|>\n"
        "<|im_start|>user\nAnd of Italy?<|im_end|>\n"
        "<|im_start|>assistant\nRome.<|im_end|>\n")
    assert rendered.text == expected_text
    # The assistant spans, found here by hand: each answer and its end-of-turn markup.
    spans = []
    for answer in ("Paris, on the Seine.<|im_end|>\n", "Rome.<|im_end|>\n"):
        start = expected_text.index("assistant\n" + answer) + len("assistant\n")
        spans.append((start, start + len(answer)))
    # Walk the tokens by decoding each one alone (not by the renderer's offsets).
    tokenizer = load_tokenizer(chatml_tokenizer)
    position, expected_mask = 0, []
    for token_id in rendered.ids.tolist():
        piece = tokenizer.decode([token_id])
        assert expected_text.startswith(piece, position)
        end = position + len(piece)
        expected_mask.append(int(any(position < e and end > s for s, e in spans)))
        position = end
    assert position == len(expected_text)
    assert rendered.loss_mask.tolist() == expected_mask
    trained = tokenizer.decode(rendered.ids[rendered.loss_mask == 1].tolist())
    assert trained == "Paris, on the Seine.<|im_end|>\nRome.<|im_end|>\n"


def test_a_template_that_rewrites_earlier_turns_is_refused(chatml_tokenizer):
    # Puts the number of turns in front: the prefix renderings are not prefixes.
    template = ("{{ messages|length }}{% for m in messages %}<{{ m['role'] }}>"
                "{{ m['content'] }}{% endfor %}")
    with pytest.raises(DatasetInputError, match="not prefix-stable"):
        ChatRenderer(chatml_tokenizer, template).render(CONVERSATION, "doc-7")


def test_chat_dataset_stores_masked_tokens_and_the_template(tmp_path, base):
    data = _write_jsonl(tmp_path / "chat.jsonl", [
        *_conversations(30),
        {"prompt": "Say hello.", "response": "Hello there, friend."},
        {"messages": [{"role": "user", "content": "no answer"}]},  # nothing to train on
        {"messages": [{"role": "pilot", "content": "x"}, {"role": "assistant", "content": "y"}]},
    ])
    stats = prepare_dataset(data, "", "", tmp_path / "ds",
                            PrepConfig.hygiene_only(seq_len=64), base=base)
    assert stats.count("read.malformed_chat") == 2
    assert stats.records_kept == 31
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert meta["chat"] == {"packing": "packed", "template": str(base.directory)}
    assert meta["train"]["loss_mask"] is True
    tokens, mask = load_token_stream(tmp_path / "ds", "train"), load_loss_mask(tmp_path / "ds",
                                                                                "train")
    assert mask is not None and len(mask) == len(tokens)
    tokenizer = load_tokenizer(tmp_path / "ds" / "tokenizer")
    trained = tokenizer.decode(tokens[mask == 1].tolist())
    assert "follows" in trained and "Question" not in trained and "user" not in trained
    assert "Hello there, friend." in trained + tokenizer.decode(
        load_token_stream(tmp_path / "ds", "heldout").tolist())
    # The trained model will carry the template it was trained with.
    assert (tmp_path / "ds" / "tokenizer" / CHAT_TEMPLATE_FILE).read_text() == base.chat_template
    assert stats.tallies["chat.train_assistant_tokens"] == int(mask.sum())


def test_pii_scrub_and_dedup_work_on_the_message_text_and_keep_the_turns(tmp_path, base):
    records = _conversations(20)
    records[3]["messages"][0]["content"] = "Write to alice.smith@example.com about it"
    records.append(json.loads(json.dumps(records[5])))  # the same conversation again
    data = _write_jsonl(tmp_path / "chat.jsonl", records)
    config = PrepConfig.hygiene_only(seq_len=64)
    config.pii, config.near_dup = PiiConfig(enabled=True), NearDupConfig(enabled=True)
    stats = prepare_dataset(data, "", "", tmp_path / "ds", config, base=base,
                            kept_path=tmp_path / "kept.jsonl")
    assert stats.duplicates_dropped == 1
    # The turns survive the near-dup stage's spool: the dataset is still chat, masked.
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["chat"]
    assert stats.tallies["pii.EMAIL"] == 1
    tokenizer = load_tokenizer(tmp_path / "ds" / "tokenizer")
    every = "".join(tokenizer.decode(load_token_stream(tmp_path / "ds", part).tolist())
                    for part in ("train", "heldout"))
    assert "alice.smith" not in every and "<EMAIL>" in every


def test_a_user_template_renders_the_data_and_ships_with_the_tokenizer(tmp_path, base):
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}### Q: {{ m['content'] }}\n"
                "{% else %}### A: {{ m['content'] }}\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}### A: {% endif %}")
    data = _write_jsonl(tmp_path / "chat.jsonl", _conversations(20))
    prepare_dataset(data, "", "", tmp_path / "ds", PrepConfig.hygiene_only(seq_len=64),
                    base=base, chat_template=template, packing="unpacked")
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert meta["chat"] == {"packing": "unpacked", "template": "user"}
    assert (tmp_path / "ds" / "tokenizer" / CHAT_TEMPLATE_FILE).read_text() == template
    tokens, mask = load_token_stream(tmp_path / "ds", "train"), load_loss_mask(tmp_path / "ds",
                                                                                "train")
    tokenizer = load_tokenizer(tmp_path / "ds" / "tokenizer")
    assert "### Q:" in tokenizer.decode(tokens.tolist())
    trained = tokenizer.decode(tokens[mask == 1].tolist())
    assert "### Q:" not in trained and "The number 2 follows 1.\n" in trained


def test_chat_data_refusals(tmp_path, base):
    chat = _write_jsonl(tmp_path / "chat.jsonl", _conversations(10))
    text = _write_jsonl(tmp_path / "text.jsonl", [{"text": f"plain document {i}"}
                                                  for i in range(10)])
    mixed = _write_jsonl(tmp_path / "mixed.jsonl", [*_conversations(5), {"text": "plain"}])
    config = PrepConfig.hygiene_only
    with pytest.raises(DatasetInputError, match=r"has no chat template.*--chat-template"):
        prepare_dataset(chat, "", "", tmp_path / "a", config(seq_len=64, vocab_size=300))
    with pytest.raises(DatasetInputError, match="mixes 5 chat records with 1 plain-text"):
        prepare_dataset(mixed, "", "", tmp_path / "b", config(seq_len=64), base=base)
    with pytest.raises(DatasetInputError, match="holds no chat records"):
        prepare_dataset(text, "", "", tmp_path / "c", config(seq_len=64), base=base,
                        packing="unpacked")
    with pytest.raises(DatasetInputError, match="packing 'tight'"):
        prepare_dataset(chat, "", "", tmp_path / "d", config(seq_len=64), base=base,
                        packing="tight")


def test_conversations_whose_answers_start_past_seq_len_are_refused_before_training(
        tmp_path, base):
    """The trainer keeps each conversation's first seq_len tokens: answers that all start
    later would train on nothing, and the run used to fail only after training."""
    long_prompt = [{"messages": [
        {"role": "system", "content": "You answer briefly and politely. " * 4},
        {"role": "user", "content": f"Please tell me which word follows number {i}."},
        {"role": "assistant", "content": "The word that follows is next."}]}
        for i in range(20)]
    data = _write_jsonl(tmp_path / "long.jsonl", long_prompt)
    with pytest.raises(DatasetInputError, match=r"no train conversation has an assistant "
                                                r"token within its first 32 tokens.*"
                                                r"LMFORGE_DATAPREP_SEQ_LEN"):
        prepare_dataset(data, "", "", tmp_path / "short", PrepConfig.hygiene_only(seq_len=32),
                        base=base)
    stats = prepare_dataset(data, "", "", tmp_path / "long",
                            PrepConfig.hygiene_only(seq_len=1024), base=base)
    assert stats.tallies["chat.train_assistant_tokens_within_seq_len"] == \
        stats.tallies["chat.train_assistant_tokens"] > 0


def test_the_loss_mask_is_cut_into_shards_with_its_tokens(tmp_path):
    import numpy as np

    writer = ShardWriter(tmp_path / "train", 7, np.dtype(np.uint16))
    docs = [(np.arange(n) + 10 * n, (np.arange(n) % 2).astype(np.uint8)) for n in (5, 9, 4)]
    for ids, mask in docs:
        writer.add(ids, loss_mask=mask)
    writer.close()
    with pytest.raises(ValueError, match="every document of a part or for none"):
        writer.add(np.arange(3))
    (tmp_path / "dataset.json").write_text(json.dumps({"train": writer.manifest()}))
    assert len(writer.shards) == 3
    assert load_loss_mask(tmp_path, "train").tolist() == np.concatenate(
        [m for _, m in docs]).tolist()
    assert load_token_stream(tmp_path, "train").tolist() == np.concatenate(
        [i for i, _ in docs]).tolist()
