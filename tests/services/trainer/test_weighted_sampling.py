"""The trainer's sampler with long-tail weights: rare documents drawn more, resume exact."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch

from lmforge.modeling import load_token_stream
from services.data_prep.packing import ShardWriter
from services.trainer.checkpoints import CheckpointIndex
from services.trainer.training import (
    DocumentIndex,
    Trainer,
    UniformWindows,
    WeightedDocumentWindows,
    build_window_sampler,
    load_document_index,
    micro_batch,
)
from tests.conftest import tiny_train_config


def _documents(seed: int = 0, count: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of `count` documents of 5..300 tokens, and a rare tenth of them."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 300, count)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rare = np.zeros(count, dtype=bool)
    rare[rng.choice(count, count // 10, replace=False)] = True
    return offsets, rare


def _exposure(sampler, offsets: np.ndarray, draws: int, seq_len: int) -> np.ndarray:
    """Sampled tokens per document over `draws` micro-batches of 16 sequences."""
    counts = np.zeros(len(offsets) - 1)
    for step in range(draws):
        rng = np.random.Generator(np.random.PCG64([7, step, 0, 0]))
        positions = sampler.positions(rng, 16)
        assert positions.shape == (16, seq_len)
        docs = np.searchsorted(offsets, positions.ravel(), side="right") - 1
        counts += np.bincount(docs, minlength=len(counts))
    return counts


@pytest.mark.parametrize("seq_len", [64, 1024])
def test_rare_documents_get_their_weight_times_their_natural_share(seq_len):
    offsets, rare = _documents()
    lengths = np.diff(offsets)
    weights = np.where(rare, 3.0, 1.0)
    weights /= (weights * lengths).sum() / lengths.sum()  # natural mean 1, as data-prep writes
    sampler = build_window_sampler(int(offsets[-1]), seq_len, DocumentIndex(offsets, weights))
    assert isinstance(sampler, WeightedDocumentWindows)

    seen = _exposure(sampler, offsets, 4000 * 64 // seq_len, seq_len)
    natural = lengths[rare].sum() / lengths.sum()
    sampled = seen[rare].sum() / seen.sum()
    # 3x the rare tenth's tokens, against the others' weight: 3 / mean weight
    assert sampled / natural == pytest.approx(weights[rare][0], rel=0.05)
    assert weights[rare][0] == pytest.approx(2.5, rel=0.1)

    uniform = _exposure(UniformWindows(int(offsets[-1]), seq_len), offsets, 300, seq_len)
    assert uniform[rare].sum() / uniform.sum() == pytest.approx(natural, rel=0.15)


def test_every_token_of_a_document_is_exposed_not_only_its_start():
    offsets = np.array([0, 50, 2050, 2100], dtype=np.int64)  # short, long, short
    sampler = WeightedDocumentWindows(DocumentIndex(offsets, np.array([1.0, 1.0, 4.0])), 128)
    counts = np.zeros(2100)
    for step in range(2000):
        positions = sampler.positions(np.random.default_rng(step), 8)
        np.add.at(counts, positions.ravel(), 1)
    per_token = np.array([counts[offsets[d]:offsets[d + 1]].mean() for d in range(3)])
    assert per_token[2] / per_token[0] == pytest.approx(4.0, rel=0.1)
    inner = counts[50 + 128 : 2050 - 128]  # the long document away from its edges
    assert inner.mean() == pytest.approx(per_token[0], rel=0.15)


def test_draws_are_a_pure_function_of_seed_step_micro_and_rank():
    offsets, rare = _documents(1)
    tokens = np.arange(offsets[-1], dtype=np.int64)
    sampler = build_window_sampler(len(tokens), 64,
                                   DocumentIndex(offsets, np.where(rare, 3.0, 0.8)))
    config = tiny_train_config(max_steps=1)
    first = micro_batch(tokens, config, 5, 1, 0, sampler)
    assert torch.equal(first, micro_batch(tokens, config, 5, 1, 0, sampler))
    for other in ((6, 1, 0), (5, 0, 0), (5, 1, 1)):
        assert not torch.equal(first, micro_batch(tokens, config, *other, sampler))


def test_a_dataset_without_weights_draws_the_windows_it_always_did():
    tokens = np.arange(10_000, dtype=np.int64)
    config = tiny_train_config(max_steps=1)
    rng = np.random.Generator(np.random.PCG64([config.seed, 3, 0, 0]))
    seq_len = config.batch.seq_len
    starts = rng.integers(0, len(tokens) - seq_len + 1, size=config.batch.micro_batch)
    before = torch.from_numpy(np.stack([tokens[s : s + seq_len] for s in starts]))
    assert torch.equal(micro_batch(tokens, config, 3, 0, 0), before)
    flat = DocumentIndex(np.array([0, 4000, 10_000]), np.array([1.0, 1.0]))
    assert isinstance(build_window_sampler(10_000, seq_len, flat), UniformWindows)


def _weighted_dataset(source, target, eos_id):
    """`source` repacked with its documents' offsets and long-tail-like weights: every
    seventh document 3x, the rest scaled so the natural mean stays 1."""
    shutil.copytree(source, target)
    meta = json.loads((target / "dataset.json").read_text())
    stream = load_token_stream(target, "train")
    ends = np.flatnonzero(stream == eos_id) + 1
    documents = np.split(stream, ends[:-1])
    raw = np.array([3.0 if i % 7 == 0 else 1.0 for i in range(len(documents))])
    lengths = np.array([len(d) for d in documents])
    weights = raw / ((raw * lengths).sum() / lengths.sum())
    shutil.rmtree(target / "train")
    writer = ShardWriter(target / "train", 1_000_000, np.dtype(meta["dtype"]))
    for document, weight in zip(documents, weights, strict=True):
        writer.add(document, float(weight))
    writer.close()
    meta["train"] = writer.manifest()
    (target / "dataset.json").write_text(json.dumps(meta))
    return target


@pytest.fixture(scope="module")
def weighted_dataset(tmp_path_factory, prepared_dataset):
    meta = json.loads((prepared_dataset.path / "dataset.json").read_text())
    return _weighted_dataset(prepared_dataset.path, tmp_path_factory.mktemp("w") / "ds",
                             meta["eos_token_id"])


def test_trainer_reads_the_weights_the_packer_wrote(weighted_dataset):
    index = load_document_index(weighted_dataset, "train")
    assert index is not None and index.weighted
    meta = json.loads((weighted_dataset / "dataset.json").read_text())
    assert meta["train"]["weighted"] is True
    assert meta["train"]["documents"] == len(index.weights) > 100
    assert int(index.offsets[-1]) == meta["train"]["tokens"]


def _trainer(tmp_path, store, dataset, run_id):
    config = tiny_train_config(max_steps=8, checkpoint_interval=2)
    return Trainer(config, dataset, store, CheckpointIndex(tmp_path, run_id, store))


def test_resume_with_weights_gives_the_same_losses_as_one_uninterrupted_run(
        tmp_path, artifact_store, weighted_dataset):
    whole_trainer = _trainer(tmp_path, artifact_store, weighted_dataset, "whole")
    assert isinstance(whole_trainer.sampler, WeightedDocumentWindows)
    whole = whole_trainer.run()

    stop = threading.Event()
    part = _trainer(tmp_path, artifact_store, weighted_dataset, "split").run(
        stop=stop, on_checkpoint=lambda ref: ref.step >= 4 and stop.set())
    assert part.preempted and part.step == 5

    rest = _trainer(tmp_path, artifact_store, weighted_dataset, "split").run()
    assert rest.resumed_from_step == 5
    assert part.losses + rest.losses == pytest.approx(whole.losses, abs=1e-6)
    assert rest.heldout_perplexity == pytest.approx(whole.heldout_perplexity, rel=1e-6)


def test_a_document_index_that_does_not_match_the_shards_is_refused(tmp_path, weighted_dataset):
    broken = tmp_path / "broken"
    shutil.copytree(weighted_dataset, broken)
    meta = json.loads((broken / "dataset.json").read_text())
    meta["train"]["tokens"] += 1
    (broken / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"does not match dataset\.json"):
        load_document_index(broken, "train")
