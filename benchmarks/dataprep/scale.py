"""The semantic index at scale: IVF-PQ over millions of synthetic clustered vectors.

    python -m benchmarks.dataprep.scale [--vectors 10000000] [--queries 1000]
        [--chunk 250000] [--out benchmarks/results/dataprep_scale.json]

The index is the one data-prep builds past `hnsw_max`
(`semantic.new_ivfpq_index`: `IVF<lists>,PQ48np,Refine(SQ8)`, inner product,
the default nprobe and refinement), trained on 40 vectors per list, then filled
chunk by chunk, so the vectors never sit in memory all at once.

Vectors (384 dims, MiniLM's): 10,000 cluster centres, random on the sphere; a
vector is its cluster's centre + a component in the cluster's own random
16-dimensional subspace (norm ~0.5) + isotropic noise (norm ~0.25), normalised.
So each cluster is a thin blob of about the intrinsic dimension of real
sentence embeddings, and a neighbour search must tell apart ~1,000 vectors per
cluster at 10M. (A first version gave every cluster the same 32-dimensional
subspace: IVF lists then cut along those shared directions, and IVF-Flat itself
reached only 0.89 recall@10 at nprobe 64 on 1M; topics in real embeddings vary
along their own directions, so the subspaces are per cluster now.) Chunk i is
generated from seed (seed, i), so it can be generated again; queries are fresh
vectors from the same distribution.

Ground truth: exact top-10 inner products of every query, kept up to date as
each chunk is added (so recall@10 is against exact search over all vectors, on
a sample of `--queries` queries). Memory is the process's peak RSS (the
generation buffers included) and the index's own bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

from services.data_prep.semantic import (
    SemanticConfig,
    ivf_lists,
    new_ivfpq_index,
    normalize_rows,
    set_search_params,
)

ROOT = Path(__file__).resolve().parents[2]
DIM = 384
CLUSTERS = 10_000
RANK = 16
QUERY_STREAM = 2**31 - 1
"""The generator stream of the queries (chunk i of the index uses stream i)."""


class ClusteredVectors:
    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng([seed, 0xC0FFEE])
        self.seed = seed
        self.centres = normalize_rows(rng.standard_normal((CLUSTERS, DIM)).astype(np.float32))
        # [CLUSTERS, RANK, DIM]: near-orthonormal rows (random directions in 384 dims)
        self.bases = (rng.standard_normal((CLUSTERS, RANK, DIM), dtype=np.float32)
                      / np.float32(np.sqrt(DIM)))

    def chunk(self, i: int, size: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, i])
        cluster = rng.integers(0, CLUSTERS, size)
        x = self.centres[cluster]
        y = rng.standard_normal((size, RANK), dtype=np.float32) * np.float32(0.5 / np.sqrt(RANK))
        for start in range(0, size, 8192):  # bounded gather of the clusters' bases
            part = slice(start, start + 8192)
            x[part] += np.einsum("nr,nrd->nd", y[part], self.bases[cluster[part]])
        # component norms ~0.5 (the blob) and ~0.25 (the noise) against the centre's 1
        x += (0.25 / np.sqrt(DIM)) * rng.standard_normal((size, DIM), dtype=np.float32)
        return normalize_rows(x)


def merge_top(scores: np.ndarray, ids: np.ndarray, new_scores: np.ndarray, new_ids: np.ndarray,
              k: int) -> tuple[np.ndarray, np.ndarray]:
    all_scores = np.concatenate([scores, new_scores], axis=1)
    all_ids = np.concatenate([ids, new_ids], axis=1)
    top = np.argpartition(-all_scores, k - 1, axis=1)[:, :k]
    return (np.take_along_axis(all_scores, top, axis=1),
            np.take_along_axis(all_ids, top, axis=1))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=10_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=250_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/"
                        "dataprep_scale.json")
    args = parser.parse_args()
    import faiss

    config = SemanticConfig()
    data = ClusteredVectors(args.seed)
    queries = data.chunk(QUERY_STREAM, args.queries)
    k = 10
    truth_scores = np.full((args.queries, k), -np.inf, dtype=np.float32)
    truth_ids = np.full((args.queries, k), -1, dtype=np.int64)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    index = new_ivfpq_index(DIM, args.vectors, config)
    lists = ivf_lists(args.vectors)
    sample_size = min(args.vectors, 40 * lists)
    sample = np.concatenate([data.chunk(1_000_000 + i, min(args.chunk, sample_size - done))
                             for i, done in enumerate(range(0, sample_size, args.chunk))])
    start = time.perf_counter()
    index.train(sample)
    timings["train_s"] = time.perf_counter() - start
    del sample
    add_s = truth_s = 0.0
    for i, offset in enumerate(range(0, args.vectors, args.chunk)):
        vectors = data.chunk(i, min(args.chunk, args.vectors - offset))
        start = time.perf_counter()
        index.add(vectors)
        add_s += time.perf_counter() - start
        start = time.perf_counter()
        exact = faiss.IndexFlatIP(DIM)  # blocked BLAS and heaps: no [queries, chunk] matrix
        exact.add(vectors)
        scores, top = exact.search(queries, k)
        truth_scores, truth_ids = merge_top(truth_scores, truth_ids, scores, top + offset, k)
        truth_s += time.perf_counter() - start
        if i % 8 == 0:
            print(json.dumps({"added": offset + len(vectors), "elapsed_s": round(
                time.perf_counter() - started, 1), "peak_rss_gib": round(peak_rss_gib(), 2)}),
                flush=True)
    timings["add_s"] = add_s
    build_s = time.perf_counter() - started - truth_s
    set_search_params(index, config)

    ivf = faiss.extract_index_ivf(index.base_index)
    index_bytes = (index.ntotal * (ivf.code_size + 8) + index.refine_index.sa_code_size()
                   * index.ntotal + ivf.nlist * DIM * 4)
    rows = []
    for nprobe in (16, 32, 64):
        set_search_params(index, {**config.index_params(), "ivf_nprobe": nprobe})
        start = time.perf_counter()
        _, found = index.search(queries, k)
        batch_ms = (time.perf_counter() - start) * 1000 / len(queries)
        singles = []
        for q in queries[:200]:
            start = time.perf_counter()
            index.search(q[None, :], k)
            singles.append((time.perf_counter() - start) * 1000)
        recall = float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth_ids,
                                                                           strict=True)]))
        rows.append({"nprobe": nprobe, "refine_factor": config.refine_factor,
                     "recall_at_10": round(recall, 4),
                     "ms_per_query_batch": round(batch_ms, 3),
                     "ms_per_query_single_median": round(float(np.median(singles)), 3)})
        print(json.dumps(rows[-1]), flush=True)

    result: dict[str, Any] = {
        "vectors": args.vectors, "dim": DIM, "queries": args.queries,
        "generator": {"clusters": CLUSTERS, "cluster_subspace_rank": RANK,
                      "subspace_norm": 0.5, "noise_norm": 0.25},
        "index": f"IVF{lists},PQ{config.pq_bytes}np,Refine(SQ8)",
        "machine": {"cpus": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(),
                    "load_avg_at_end": os.getloadavg()[0]},
        "build_s": round(build_s, 1), "train_s": round(timings["train_s"], 1),
        "add_s": round(timings["add_s"], 1), "train_vectors": sample_size,
        "index_gib": round(index_bytes / 2**30, 2), "peak_rss_gib": round(peak_rss_gib(), 2),
        "search": rows, "default_nprobe": config.ivf_nprobe,
        "targets": {"ms_per_query": 10, "recall_at_10": 0.9, "memory_gib": 8},
    }
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
