"""Long-tail exposure: how much more the rarest clusters are seen in the batches the
trainer actually draws.

    python -m benchmarks.dataprep.long_tail [--docs 6000] [--cap 3] [--micro-batches 3000]
        [--seq-len 128 1024] [--work /tmp/lmforge-bench/long-tail]
        [--out benchmarks/results/dataprep_long_tail.json]

Documents: a seeded sample of the real Debian texts of benchmarks/dataprep/corpus.py
(fortunes, man-page paragraphs, dictionary entries, Chinese fortunes and man pages).
They go through data-prep's own code: `semantic.curate` (MiniLM chunk embeddings,
faiss k-means with k = sqrt(documents), cap `--cap`), a BPE tokenizer trained by
data-prep, and `packing.encode_documents` into shards and `documents.safetensors`,
twice: with the clusters, so the writer weights them on token counts (what
data-prep does), and with `curate`'s own weights, computed on characters before
tokenizing (for comparison). The trainer's own
`build_window_sampler` and `micro_batch` then draw `--micro-batches` micro-batches
of 16 sequences (seeded by (seed, step, micro, rank) as in training); every
sampled token is traced to its document (micro_batch over the stream of positions
0..N-1 returns the positions it drew) and so to its cluster.

Exposure of a set of clusters = its share of the sampled tokens / its share of the
packed tokens (natural). Reported for the rarest decile of clusters by natural
share (target 2.5-3.0 with cap 3), the other deciles, the unweighted sampler, and
a start-weighted window sampler (window starts drawn by document weight, windows
over the natural stream) to show why the trainer packs drawn documents instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from benchmarks.dataprep.corpus import fetch_debian_texts, read_sources
from services.data_prep.documents import DecisionLog, Document
from services.data_prep.packing import ShardWriter, encode_documents, token_dtype
from services.data_prep.semantic import SemanticConfig, curate
from services.data_prep.tokenizer_training import EOS_TOKEN, train_bpe_tokenizer
from services.trainer.config import TrainConfig
from services.trainer.training import (
    DocumentIndex,
    UniformWindows,
    build_window_sampler,
    load_document_index,
    micro_batch,
)

ROOT = Path(__file__).resolve().parents[2]


class StartWeightedWindows:
    """The alternative: a window over the natural stream whose start is drawn with
    probability proportional to its document's weight."""

    def __init__(self, index: DocumentIndex, seq_len: int) -> None:
        self.seq_len = seq_len
        self.offsets = index.offsets
        valid = np.minimum(index.offsets[1:], index.offsets[-1] - seq_len + 1)
        self.starts = index.offsets[:-1]
        self.spans = np.maximum(valid - self.starts, 0)
        self.cumulative = np.cumsum(index.weights * self.spans)

    def positions(self, rng: np.random.Generator, count: int) -> np.ndarray:
        u = rng.random(count) * self.cumulative[-1]
        doc = np.minimum(np.searchsorted(self.cumulative, u, side="right"), len(self.spans) - 1)
        before = np.where(doc > 0, self.cumulative[np.maximum(doc - 1, 0)], 0.0)
        offset = ((u - before) / (self.cumulative[doc] - before) * self.spans[doc]).astype(
            np.int64)
        start = self.starts[doc] + np.minimum(offset, np.maximum(self.spans[doc] - 1, 0))
        return start[:, None] + np.arange(self.seq_len)


def exposure(sampler, config: TrainConfig, num_tokens: int, micro_batches: int,
             token_cluster: np.ndarray, clusters: int) -> np.ndarray:
    """Sampled tokens per cluster over `micro_batches` of the trainer's micro_batch."""
    positions = np.arange(num_tokens, dtype=np.int64)
    counts = np.zeros(clusters)
    for step in range(micro_batches):
        drawn = micro_batch(positions, config, step, 0, 0, sampler).numpy()
        counts += np.bincount(token_cluster[drawn.ravel()], minlength=clusters)
    return counts


def decile_ratios(sampled: np.ndarray, natural: np.ndarray) -> list[float]:
    order = np.argsort(natural, kind="stable")
    size = math.ceil(len(order) / 10)
    out = []
    for d in range(0, len(order), size):
        members = order[d : d + size]
        out.append(round(float((sampled[members].sum() / sampled.sum())
                               / (natural[members].sum() / natural.sum())), 3))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=6000)
    parser.add_argument("--cap", type=float, default=3.0)
    parser.add_argument("--micro-batches", type=int, default=3000)
    parser.add_argument("--seq-len", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmforge-bench/long-tail"))
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks/results/dataprep_long_tail.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    sources = read_sources(fetch_debian_texts(args.work))
    random.Random(args.seed).shuffle(sources)
    docs = [Document(f"d{i}", s.text, source=s.source) for i, s in enumerate(
        sources[: args.docs])]
    start = time.perf_counter()
    semantic = curate(docs, [], SemanticConfig(long_tail_cap=args.cap, seed=args.seed),
                      DecisionLog(), build_retrieval_index=False)
    curate_s = time.perf_counter() - start
    weights = [semantic.weights[d.id] for d in docs]
    labels = np.array([semantic.clusters[d.id] for d in docs])

    tokenizer = train_bpe_tokenizer((d.text for d in docs), 4096)
    eos = tokenizer.token_to_id(EOS_TOKEN)
    dtype = token_dtype(tokenizer.get_vocab_size())
    result: dict[str, Any] = {
        "corpus": {"documents": len(docs), "clusters": semantic.cluster_count,
                   "sources": sorted({d.source.split("/")[0] for d in docs}),
                   "curate_s": round(curate_s, 1)},
        "cap": args.cap, "rarest_decile_clusters": math.ceil(semantic.cluster_count / 10),
        "target": [2.5, 3.0], "weighting": {},
    }
    for variant, packing in (("from_tokens", {"clusters": labels.tolist()}),
                             ("from_characters", {"weights": weights})):
        dataset = args.work / f"dataset-{variant}"
        writer = ShardWriter(dataset / "train", 1_000_000, dtype, long_tail_cap=args.cap)
        encode_documents(tokenizer, (d.text for d in docs), eos, writer, **packing)
        writer.close()
        (dataset / "dataset.json").write_text(json.dumps({"train": writer.manifest()}))
        index = load_document_index(dataset, "train")
        assert index is not None
        result["weighting"][variant] = measure(index, labels, semantic.cluster_count, args)
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


def measure(index: DocumentIndex, labels: np.ndarray, clusters: int,
            args: argparse.Namespace) -> dict[str, Any]:
    num_tokens = int(index.offsets[-1])
    lengths = np.diff(index.offsets)
    token_cluster = np.repeat(labels, lengths)
    natural = np.bincount(token_cluster, minlength=clusters).astype(np.float64)
    out: dict[str, Any] = {
        "tokens": num_tokens,
        "weights": {"min": round(float(index.weights.min()), 3),
                    "max": round(float(index.weights.max()), 3),
                    "token_weighted_mean": round(float(
                        (index.weights * lengths).sum() / num_tokens), 4)},
        "samplers": {}}
    for seq_len in args.seq_len:
        config = TrainConfig.from_preset("tiny", seq_len=seq_len, micro_batch=16)
        batches = max(200, args.micro_batches * 128 // seq_len)
        rows = {}
        for name, sampler in (
                ("trainer_weighted", build_window_sampler(num_tokens, seq_len, index)),
                ("uniform_windows", UniformWindows(num_tokens, seq_len)),
                ("start_weighted_windows", StartWeightedWindows(index, seq_len))):
            start = time.perf_counter()
            sampled = exposure(sampler, config, num_tokens, batches, token_cluster, clusters)
            ratios = decile_ratios(sampled, natural)
            rows[name] = {"rarest_decile_exposure": ratios[0], "deciles": ratios,
                          "sampled_tokens": int(sampled.sum()),
                          "ms_per_micro_batch": round((time.perf_counter() - start)
                                                      * 1000 / batches, 3)}
            print(json.dumps({"seq_len": seq_len, name: rows[name]}), flush=True)
        out["samplers"][f"seq_len_{seq_len}"] = rows
    return out


if __name__ == "__main__":
    main()
