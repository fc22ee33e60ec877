"""Training on chat data: packed conversations see only themselves, packed and unpacked
training compute the same loss and gradients, the loss skips everything but assistant
tokens, and a chat run resumes exactly."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from lmforge.base_models import inspect_base_model
from lmforge.modeling import load_causal_lm, load_loss_mask, load_token_stream
from services.data_prep.prepare import PrepConfig, prepare_dataset
from services.trainer.checkpoints import CheckpointIndex
from services.trainer.config import TrainConfig
from services.trainer.conversations import IGNORE_INDEX, ConversationRows
from services.trainer.training import Trainer, load_document_index


def _conversations(n):
    return [{"messages": [
        {"role": "user", "content": f"Which number comes after {i}?" + " Think." * (i % 4)},
        {"role": "assistant", "content": f"After {i} comes {i + 1}." + " Yes." * (i % 3)}]}
        for i in range(n)]


@pytest.fixture(scope="module")
def chat_dataset(tmp_path_factory, artifact_store, base_models):
    base = inspect_base_model(str(base_models["llama"]), [base_models["llama"].parent])
    work = tmp_path_factory.mktemp("chat-ds")
    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _conversations(60)))
    prepare_dataset(data, "", "", work / "ds", PrepConfig.hygiene_only(seq_len=64), base=base)
    return artifact_store.put_dir(work / "ds")


def _rows(dataset_dir, *, packed, seq_len=256):
    index = load_document_index(dataset_dir, "train")
    return ConversationRows(index.offsets, index.weights, load_loss_mask(dataset_dir, "train"),
                            seq_len=seq_len, packed=packed, pad_token_id=0), index


def test_a_packed_conversation_attends_only_to_itself(chat_dataset, base_models):
    model = load_causal_lm(base_models["llama"])
    tokens = load_token_stream(chat_dataset.path, "train")
    rows, index = _rows(chat_dataset.path, packed=True)
    batch = rows.lay_out(tokens, [0, 1, 2])
    assert batch.position_ids is not None and int((batch.position_ids[0] == 0).sum()) >= 3
    with torch.no_grad():
        packed = model(**batch.model_inputs(torch.device("cpu"))).logits[0]
        causal = model(input_ids=batch.input_ids, use_cache=False).logits[0]
        at = 0
        for doc in (0, 1, 2):
            start, end = int(index.offsets[doc]), int(index.offsets[doc + 1])
            alone = model(input_ids=torch.from_numpy(tokens[start:end])[None]).logits[0]
            assert torch.allclose(packed[at : at + end - start], alone, atol=1e-5)
            if doc:  # the control: one plain causal mask lets the later ones see the earlier
                assert not torch.allclose(causal[at : at + end - start], alone, atol=1e-3)
            at += end - start


def test_packed_and_unpacked_batches_give_the_same_loss_and_gradients(chat_dataset,
                                                                      base_models):
    tokens = load_token_stream(chat_dataset.path, "train")
    docs = list(range(8))
    grads, losses, row_counts = [], [], []
    for packed in (True, False):
        model = load_causal_lm(base_models["llama"])
        rows, _ = _rows(chat_dataset.path, packed=packed)
        batch = rows.lay_out(tokens, docs)
        row_counts.append(batch.input_ids.shape[0])
        logits = model(**{k: v for k, v in batch.model_inputs(torch.device("cpu")).items()
                          if k != "labels"}).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum")
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert row_counts[1] == 8 and row_counts[0] < 8  # packing saved rows
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_only_assistant_tokens_are_targets(chat_dataset):
    tokens = load_token_stream(chat_dataset.path, "train")
    mask = load_loss_mask(chat_dataset.path, "train")
    rows, index = _rows(chat_dataset.path, packed=True)
    batch = rows.lay_out(tokens, [0, 1])
    n0, n1 = (int(index.offsets[d + 1] - index.offsets[d]) for d in (0, 1))
    expected = np.where(mask[: n0 + n1] == 1, tokens[: n0 + n1], IGNORE_INDEX)
    expected[0] = expected[n0] = IGNORE_INDEX  # no target across a boundary
    assert batch.labels[0, : n0 + n1].tolist() == expected.tolist()
    assert (batch.labels[0, n0 + n1 :] == IGNORE_INDEX).all()  # padding


def _trainer(tmp_path, store, dataset, base_dir, run_id):
    config = TrainConfig.from_preset("test-tiny", max_steps=6, checkpoint_interval=2,
                                     pretrained_dir=base_dir, learning_rate=1e-3)
    return Trainer(config, dataset.path, store, CheckpointIndex(tmp_path, run_id, store))


def test_chat_training_resumes_exactly(tmp_path, artifact_store, chat_dataset, base_models):
    base_dir = base_models["llama"]
    whole = _trainer(tmp_path, artifact_store, chat_dataset, base_dir, "chat-whole").run()
    first = _trainer(tmp_path, artifact_store, chat_dataset, base_dir, "chat-split")
    assert first.conversations is not None and first.conversations.packed
    stop = threading.Event()
    part = first.run(stop=stop, on_checkpoint=lambda ref: ref.step >= 2 and stop.set())
    assert part.preempted
    rest = _trainer(tmp_path, artifact_store, chat_dataset, base_dir, "chat-split").run()
    assert part.losses + rest.losses == pytest.approx(whole.losses, abs=1e-6)
    assert whole.assistant_perplexity > 1
    assert rest.assistant_perplexity == pytest.approx(whole.assistant_perplexity, rel=1e-6)
