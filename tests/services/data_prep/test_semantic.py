"""The semantic index: chunking, the FAISS index on disk, decontamination, SemDeDup,
long-tail weights, and the packed document index the trainer reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from services.data_prep.documents import DecisionLog, Document
from services.data_prep.packing import DOCUMENT_INDEX, ShardWriter, encode_documents
from services.data_prep.semantic import (
    CONTAMINATES_HELDOUT,
    NEAR_DUPLICATE,
    STAGE,
    MiniLMEmbedder,
    SemanticConfig,
    SemanticIndex,
    build_index,
    choose_cluster_count,
    chunk_text,
    chunk_texts,
    curate,
    embed_documents,
    long_tail_weights,
    search,
)
from tests.conftest import TEST_DATA

MOON = "The moon may be smaller than Earth, but it's further away."
MOON_PARAPHRASE = "Although the moon is smaller than the earth, it is farther away."


def _fortunes() -> list[Document]:
    text = (TEST_DATA / "fortunes-sample.txt").read_text(encoding="utf-8")
    records = [r.strip() for r in text.split("\n%\n") if r.strip()]
    return [Document(f"fortune-{i}", r, source="fortunes-sample.txt")
            for i, r in enumerate(records)]


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder()


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    """300 fortunes, without the moon pair (the decontamination test plants it)."""
    return [d for d in _fortunes() if "moon is smaller" not in d.text
            and "moon may be smaller" not in d.text][:300]


# -- chunking ---------------------------------------------------------------------------


def test_long_documents_are_cut_into_overlapping_chunks_of_the_original_text():
    text = " ".join(f"w{i}" for i in range(300))
    chunks = chunk_text(text, chunk_words=128, overlap=16)
    assert [len(c.split()) for c in chunks] == [128, 128, 76]
    assert chunks[0].split()[-16:] == chunks[1].split()[:16]
    assert chunks[1].startswith("w112 ") and chunks[-1].endswith("w299")
    assert chunk_text("short  text\nkept as is") == ["short  text\nkept as is"]
    assert chunk_text(" \n\t ") == []


def test_chinese_is_chunked_by_character():
    text = "机器学习是人工智能的一个分支" * 20  # 280 characters, no spaces
    chunks = chunk_text(text, chunk_words=100, overlap=10)
    assert [len(c) for c in chunks] == [100, 100, 100]
    assert "".join(c[10:] if i else c for i, c in enumerate(chunks)) == text


# -- the index --------------------------------------------------------------------------


@pytest.mark.parametrize("flat_max", [100_000, 50], ids=["flat", "hnsw"])
def test_saved_index_finds_the_document_of_an_exact_sentence(tmp_path, embedder, corpus,
                                                             flat_max):
    config = SemanticConfig(flat_max=flat_max)
    chunks = embed_documents(corpus, embedder)
    everything = np.ones(len(corpus), dtype=bool)
    built = SemanticIndex.build(chunks, config, lambda: chunk_texts(corpus, everything, config))
    built.save(tmp_path / "index")

    loaded = SemanticIndex.load(tmp_path / "index")
    assert loaded.meta["kind"] == ("flat" if flat_max > 1000 else "hnsw")
    assert loaded.meta["chunks"] == chunks.count == loaded.index.ntotal
    for doc in (corpus[7], corpus[150], corpus[-1]):
        sentence = doc.text.splitlines()[0]
        hits = search(tmp_path / "index", sentence, k=3, embedder=embedder)
        assert len(hits) == 3
        assert hits[0].doc_id == doc.id
        assert sentence in hits[0].chunk_text
        assert hits[0].score >= hits[1].score >= hits[2].score
    if loaded.meta["kind"] == "hnsw":
        loaded.use_embedder(embedder)  # else it loads the one index.json names, as the CLI does
    top = loaded.search(corpus[42].text, k=1)[0]
    assert top.doc_id == corpus[42].id and top.score == pytest.approx(1.0, abs=1e-4)


def test_loading_a_directory_without_an_index_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a semantic index"):
        SemanticIndex.load(tmp_path)


def test_ivf_pq_past_the_hnsw_size_finds_planted_neighbours():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((64, 384)).astype(np.float32)
    vectors = centers[rng.integers(0, 64, 3_000)] + 0.3 * rng.standard_normal(
        (3_000, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    config = SemanticConfig(flat_max=500, hnsw_max=2_000)
    index = build_index(vectors, config)
    assert type(index).__name__ == "IndexRefine"
    queries = vectors[:50] + 0.01 * rng.standard_normal((50, 384)).astype(np.float32)
    _, found = index.search(queries / np.linalg.norm(queries, axis=1, keepdims=True), 1)
    assert (found[:, 0] == np.arange(50)).mean() >= 0.95


# -- decontamination and semantic dedup -------------------------------------------------


def test_training_copy_or_paraphrase_of_a_heldout_document_is_dropped(embedder, corpus):
    heldout = [Document("held-moon", MOON), Document("held-1", corpus[0].text)]
    train = [*corpus[1:120], Document("train-copy", "  " + corpus[0].text.upper() + " "),
             Document("train-paraphrase", MOON_PARAPHRASE)]
    log = DecisionLog()
    result = curate(train, heldout, SemanticConfig(reweight=False), log, embedder=embedder,
                    build_retrieval_index=False)

    assert log.counts[(STAGE, CONTAMINATES_HELDOUT)] == 2 == result.contaminating
    assert "train-copy" not in result.kept_ids and "train-paraphrase" not in result.kept_ids
    assert len(result.kept_ids) == 119


def test_decontamination_reports_each_drop_with_the_heldout_document(tmp_path, embedder,
                                                                     corpus):
    log = DecisionLog(tmp_path / "decisions.jsonl")
    train = [*corpus[:30], Document("copy", MOON_PARAPHRASE)]
    result = curate(lambda: iter(train), lambda: iter([Document("held-moon", MOON)]),
                    SemanticConfig(reweight=False), log, embedder=embedder)
    log.close()
    assert result.kept_ids == [d.id for d in corpus[:30]]
    assert result.index is not None and result.index.meta["documents"] == 30
    [line] = [json.loads(x) for x in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    assert line["id"] == "copy" and line["reason"] == CONTAMINATES_HELDOUT
    assert "held-moon" in line["detail"]


def test_semantic_dedup_is_off_by_default_and_drops_near_copies_when_on(embedder, corpus):
    docs = [*corpus[:80], Document("near-copy", corpus[30].text + "!"),
            Document("near-copy-2", corpus[60].text.replace(".", "!"))]
    off = curate(docs, [], SemanticConfig(), DecisionLog(), embedder=embedder,
                 build_retrieval_index=False)
    assert off.near_duplicates == 0 and len(off.kept_ids) == 82

    log = DecisionLog()
    on = curate(docs, [], SemanticConfig(semantic_dedup=True), log, embedder=embedder,
                build_retrieval_index=False)
    dropped = {d.id for d in docs} - set(on.kept_ids)
    # the sample's own near-copies go too: "A visit to a strange place will bring fresh
    # work." (of "... fresh place ... strange work.") and the blond/black shoe pair
    assert dropped == {"near-copy", "near-copy-2", "fortune-6", "fortune-40"}
    assert log.counts[(STAGE, NEAR_DUPLICATE)] == on.near_duplicates == 4


# -- long-tail weights ------------------------------------------------------------------


def test_weights_keep_the_token_total_and_give_the_smallest_clusters_the_cap():
    rng = np.random.default_rng(1)
    labels = np.concatenate([np.zeros(500), np.full(200, 1), np.full(100, 2),
                             rng.integers(3, 20, 300), np.full(5, 20), np.full(3, 21)])
    lengths = rng.integers(10, 400, len(labels)).astype(np.float64)
    weights = long_tail_weights(labels, lengths, cap=3.0)

    assert (weights * lengths).sum() == pytest.approx(lengths.sum(), rel=1e-9)
    assert weights.max() == pytest.approx(3.0, rel=1e-9)
    assert weights.min() >= 1 / 3 - 1e-9
    assert np.all(weights[labels == 21] == pytest.approx(3.0))
    assert np.all(weights[labels == 0] < 1)  # the largest cluster gives up share
    per_cluster = {int(c): weights[labels == c][0] for c in np.unique(labels)}
    share = {int(c): lengths[labels == c].sum() for c in np.unique(labels)}
    ordered = sorted(per_cluster, key=lambda c: share[c])
    sampled = np.array([per_cluster[c] * share[c] for c in ordered])
    assert np.all(np.diff(sampled) >= -1e-9 * sampled.max())  # never outgrows a larger one


@pytest.mark.parametrize("cap", [1.0, 5.0])
def test_cap_bounds_the_multipliers_both_ways(cap):
    labels = np.array([0] * 90 + [1] * 9 + [2])
    lengths = np.ones(100)
    weights = long_tail_weights(labels, lengths, cap=cap)
    assert weights.max() <= cap + 1e-9 and weights.min() >= 1 / cap - 1e-9
    assert weights.sum() == pytest.approx(100)
    if cap == 1.0:
        assert np.all(weights == 1.0)


def test_one_cluster_or_no_documents_is_all_natural():
    assert np.all(long_tail_weights(np.zeros(5), np.arange(1, 6)) == 1.0)
    assert len(long_tail_weights(np.zeros(0), np.zeros(0))) == 0
    assert choose_cluster_count(3) == 1 and choose_cluster_count(10_000) == 100
    assert choose_cluster_count(10_000_000) == 1024


def test_curate_weights_every_kept_document_and_indexes_it(embedder, corpus):
    result = curate(corpus, [], SemanticConfig(), DecisionLog(), embedder=embedder)
    lengths = np.array([len(d.text) for d in corpus], dtype=np.float64)
    weights = np.array([result.weights[d.id] for d in corpus])
    assert result.cluster_count == choose_cluster_count(len(corpus)) == 17
    assert (weights * lengths).sum() == pytest.approx(lengths.sum(), rel=1e-6)
    assert weights.max() == pytest.approx(3.0, rel=1e-6) and weights.min() < 1
    assert result.index is not None and result.index.meta["documents"] == len(corpus)


# -- the document index in the packed shards --------------------------------------------


class _Ids:
    def __init__(self, ids):
        self.ids = ids


class _CharTokenizer:
    """One token per character: enough to check offsets without training a tokenizer."""

    def encode_batch(self, texts, add_special_tokens=False):
        return [_Ids([ord(c) % 200 for c in t]) for t in texts]


def test_packing_records_each_documents_offset_and_weight(tmp_path):
    writer = ShardWriter(tmp_path / "train", shard_tokens=7, dtype=np.dtype(np.uint16))
    texts = ["abc", "de", "fghijkl", "m"]
    encode_documents(_CharTokenizer(), texts, 255, writer, batch_size=3,
                     weights=[1.0, 3.0, 0.5, 1.0])
    writer.close()
    index = load_file(str(tmp_path / "train" / DOCUMENT_INDEX))
    assert index["offsets"].tolist() == [0, 4, 7, 15, 17]
    assert index["weights"].tolist() == [1.0, 3.0, 0.5, 1.0]
    assert writer.manifest() == {"shards": writer.shards, "tokens": 17, "documents": 4,
                                 "document_index": DOCUMENT_INDEX, "weighted": True}


def test_packing_without_weights_is_unweighted_and_refuses_a_short_weight_list(tmp_path):
    writer = ShardWriter(tmp_path / "a", shard_tokens=100, dtype=np.dtype(np.uint16))
    encode_documents(_CharTokenizer(), ["ab", "c"], 255, writer)
    writer.close()
    assert writer.manifest()["weighted"] is False
    other = ShardWriter(tmp_path / "b", shard_tokens=100, dtype=np.dtype(np.uint16))
    with pytest.raises(ValueError, match="fewer weights than documents"):
        encode_documents(_CharTokenizer(), ["ab", "c"], 255, other,
                         weights=[1.0])


def test_packing_with_clusters_weights_them_on_token_counts(tmp_path):
    writer = ShardWriter(tmp_path / "train", shard_tokens=50, dtype=np.dtype(np.uint16),
                         long_tail_cap=3.0)
    texts = ["x" * 40] * 6 + ["y" * 9] + ["z" * 30] * 3  # clusters 0, 1 (rare), 2
    encode_documents(_CharTokenizer(), texts, 255, writer, clusters=[0] * 6 + [1] + [2] * 3)
    writer.close()
    index = load_file(str(tmp_path / "train" / DOCUMENT_INDEX))
    lengths = np.diff(index["offsets"])
    assert lengths.tolist() == [41] * 6 + [10] + [31] * 3  # end-of-text included
    weights = index["weights"]
    assert weights[6] == pytest.approx(3.0)  # the rare cluster, by its 10 tokens
    assert (weights * lengths).sum() == pytest.approx(lengths.sum(), rel=1e-5)
    assert np.array_equal(weights, writer.weights) and writer.manifest()["weighted"]
    with pytest.raises(ValueError, match="every document of a part or for none"):
        writer.add(np.zeros(3, dtype=np.int64))


def test_an_index_saved_from_documents_that_changed_since_embedding_is_refused(tmp_path,
                                                                              embedder,
                                                                              corpus):
    config = SemanticConfig()
    chunks = embed_documents(corpus[:10], embedder)
    changed = [*corpus[:9], Document(corpus[9].id, corpus[9].text + " more" * 200)]
    index = SemanticIndex.build(chunks, config,
                                lambda: chunk_texts(changed, np.ones(10, dtype=bool), config))
    with pytest.raises(RuntimeError, match="changed since they were embedded"):
        index.save(tmp_path / "index")


def test_a_split_without_text_chunks_saves_an_empty_index_that_search_says_is_empty(
        tmp_path, embedder):
    result = curate([Document("blank", "   ")], [], SemanticConfig(reweight=False),
                    DecisionLog(), embedder=embedder)
    assert result.index is not None
    result.index.save(tmp_path / "index")
    assert search(tmp_path / "index", "anything", embedder=embedder) == []


def test_a_static_embedder_is_refused_for_decontamination_and_dedup_but_not_for_weights():
    with pytest.raises(ValueError, match="cannot decide what is a copy"):
        SemanticConfig(embedder="model2vec:/models/m2v")
    with pytest.raises(ValueError, match="cannot decide what is a copy"):
        SemanticConfig(embedder="model2vec:/models/m2v", decontaminate=False,
                       semantic_dedup=True)
    SemanticConfig(embedder="model2vec:/models/m2v", decontaminate=False)
