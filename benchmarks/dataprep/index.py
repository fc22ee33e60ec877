"""The semantic index: embedding throughput, and recall@10 / ms per query of the index.

    python -m benchmarks.dataprep.index [--chunks 200000] [--queries 1000]
        [--minilm-chunks 8000] [--work /tmp/lmforge-bench/index]
        [--out benchmarks/results/dataprep_index.json]

Text: the real Debian texts of benchmarks/dataprep/corpus.py (fortunes, man-page
paragraphs, four dictd dictionaries, Chinese fortunes and man pages; fetched
with `apt-get download` + `dpkg -x`), cut by data-prep's own `chunk_text`
(128 units, 16 overlap), shuffled; `--chunks` go into the index and `--queries`
other chunks are the queries. Without apt, tests/data repeated is the fallback
and the JSON says so.

Embedders, on the same `--minilm-chunks` sample: the packaged MiniLM (the
pipeline's default) and a model2vec static model distilled here from that same
MiniLM (`semantic.distill_static_model`; no pretrained model2vec model is
packaged for offline use). Reported: chunks/s, and the recall of each query's
10 nearest neighbours under model2vec against those under MiniLM.

MiniLM embeds ~100 chunks/s on 2 cores, so 200k chunks would take over half an
hour; the index figures use model2vec vectors of the same real chunks (384
dims, like MiniLM's), and the same index settings are also checked on the
MiniLM vectors of the sample. Ground truth is exact search (IndexFlatIP).
ms/query is measured two ways: a batch of all queries on 2 threads (wall /
queries), and one query at a time (median).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from benchmarks.dataprep.corpus import fetch_debian_texts, read_sources
from services.data_prep.semantic import (
    MiniLMEmbedder,
    SemanticConfig,
    StaticEmbedder,
    build_index,
    chunk_text,
    distill_static_model,
    set_search_params,
)

ROOT = Path(__file__).resolve().parents[2]


def real_chunks(work: Path, wanted: int, seed: int) -> tuple[list[str], dict[str, Any]]:
    root = fetch_debian_texts(work)
    docs = read_sources(root)
    chunks = [c for d in docs for c in chunk_text(d.text)]
    source = {"documents": len(docs), "chunks_available": len(chunks),
              "fallback": root is None}
    if len(chunks) < wanted:  # tests/data only: repeat with a varying prefix
        base = list(chunks)
        chunks = [f"({i // len(base)}) {base[i % len(base)]}" for i in range(wanted)]
        source["repeated_with_variation"] = True
    random.Random(seed).shuffle(chunks)
    return chunks[:wanted], source


def timed_encode(embedder, texts: list[str]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    vectors = embedder.encode(texts)
    return vectors, time.perf_counter() - start


def exact_neighbours(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    import faiss

    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(base)
    return flat.search(queries, k)[1]


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth,
                                                                        strict=True)]))


def measure_search(index, queries: np.ndarray, truth: np.ndarray, k: int = 10,
                   singles: int = 200) -> dict[str, float]:
    start = time.perf_counter()
    _, found = index.search(queries, k)
    batch_ms = (time.perf_counter() - start) * 1000 / len(queries)
    latencies = []
    for q in queries[:singles]:
        start = time.perf_counter()
        index.search(q[None, :], k)
        latencies.append((time.perf_counter() - start) * 1000)
    return {"recall_at_10": round(recall_at(found, truth), 4),
            "ms_per_query_batch": round(batch_ms, 4),
            "ms_per_query_single_median": round(float(np.median(latencies)), 4)}


def index_bytes(index) -> int:
    import faiss

    return len(faiss.serialize_index(index))


def hnsw_sweep(base: np.ndarray, queries: np.ndarray, truth: np.ndarray,
               ms: list[int], ef_construction: int, ef_searches: list[int]) -> list[dict]:
    rows = []
    for m in ms:
        config = SemanticConfig(hnsw_m=m, hnsw_ef_construction=ef_construction, flat_max=1)
        start = time.perf_counter()
        index = build_index(base, config, "hnsw")
        build_s = time.perf_counter() - start
        size = index_bytes(index)
        for ef in ef_searches:
            index.hnsw.efSearch = ef
            rows.append({"M": m, "efConstruction": ef_construction, "efSearch": ef,
                         "build_s": round(build_s, 1), "bytes_per_vector":
                         round(size / len(base)), **measure_search(index, queries, truth)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def ivfpq_sweep(base: np.ndarray, queries: np.ndarray, truth: np.ndarray,
                nprobes: list[int]) -> list[dict]:
    config = SemanticConfig(flat_max=1, hnsw_max=1)
    start = time.perf_counter()
    index = build_index(base, config, "ivfpq")
    build_s = time.perf_counter() - start
    size = index_bytes(index)
    rows = []
    for nprobe in nprobes:
        set_search_params(index, {**config.index_params(), "ivf_nprobe": nprobe})
        rows.append({"kind": "IVF,PQ48np,Refine(SQ8)", "nprobe": nprobe,
                     "refine_factor": config.refine_factor, "build_s": round(build_s, 1),
                     "bytes_per_vector": round(size / len(base)),
                     **measure_search(index, queries, truth)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--minilm-chunks", type=int, default=8000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmforge-bench/index"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/"
                        "dataprep_index.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import faiss

    texts, source = real_chunks(args.work, args.chunks + args.queries, args.seed)
    sample = texts[: args.minilm_chunks]
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(),
                    "load_avg_at_start": os.getloadavg()[0]},
        "text": {**source, "indexed_chunks": args.chunks, "query_chunks": args.queries,
                 "mean_words_per_chunk": round(float(np.mean(
                     [len(t.split()) for t in texts])), 1)},
    }

    minilm = MiniLMEmbedder()
    minilm.encode(sample[:64])  # warm-up
    minilm_vectors, minilm_s = timed_encode(minilm, sample)
    start = time.perf_counter()
    m2v_dir = distill_static_model(args.work / "model2vec-minilm")
    distill_s = time.perf_counter() - start
    static = StaticEmbedder(m2v_dir)
    static.encode(sample[:64])
    static_vectors, static_s = timed_encode(static, sample)
    probe = min(1000, len(sample) // 4)
    truth_minilm = exact_neighbours(minilm_vectors, minilm_vectors[:probe], 11)[:, 1:]
    truth_static = exact_neighbours(static_vectors, static_vectors[:probe], 11)[:, 1:]
    result["embedding"] = {
        "sample_chunks": len(sample),
        "minilm": {"chunks_per_s": round(len(sample) / minilm_s, 1), "dim": minilm.dim},
        "model2vec_distilled_from_minilm": {
            "chunks_per_s": round(len(sample) / static_s, 1), "dim": static.dim,
            "distill_s": round(distill_s, 1),
            "neighbour_recall_at_10_vs_minilm": round(recall_at(truth_static, truth_minilm),
                                                      4)},
        "pretrained_model2vec_offline": False,
    }
    print(json.dumps(result["embedding"]), flush=True)

    start = time.perf_counter()
    vectors = static.encode(texts)
    result["embedding"]["model2vec_all_chunks_s"] = round(time.perf_counter() - start, 1)
    base, queries = vectors[: args.chunks], vectors[args.chunks :]
    start = time.perf_counter()
    truth = exact_neighbours(base, queries, 10)
    exact_ms = (time.perf_counter() - start) * 1000 / len(queries)
    result["exact_search_ms_per_query_batch"] = round(exact_ms, 3)
    result["hnsw_model2vec_vectors"] = hnsw_sweep(base, queries, truth, [16, 32], 128,
                                                  [32, 64, 128, 192, 256])
    result["ivfpq_model2vec_vectors"] = ivfpq_sweep(base, queries, truth, [8, 16, 32, 64])

    # The same HNSW settings on real MiniLM vectors (the sample: smaller, same geometry
    # as the pipeline's).
    mq = min(500, len(sample) // 10)
    mbase, mqueries = minilm_vectors[mq:], minilm_vectors[:mq]
    mtruth = exact_neighbours(mbase, mqueries, 10)
    result["hnsw_minilm_vectors"] = hnsw_sweep(mbase, mqueries, mtruth, [32], 128,
                                               [64, 192])

    chosen = SemanticConfig()
    pick = next(r for r in result["hnsw_model2vec_vectors"]
                if r["M"] == chosen.hnsw_m and r["efSearch"] == chosen.hnsw_ef_search)
    result["chosen"] = {"hnsw_M": chosen.hnsw_m, "efSearch": chosen.hnsw_ef_search,
                        "efConstruction": chosen.hnsw_ef_construction, **pick,
                        "targets": {"recall_at_10": 0.95, "ms_per_query": 1.0}}
    per_vector_s = pick["build_s"] / args.chunks
    result["cut_over"] = {
        "hnsw_max": chosen.hnsw_max,
        "hnsw_bytes_at_hnsw_max_gib": round(pick["bytes_per_vector"] * chosen.hnsw_max
                                            / 2**30, 2),
        "hnsw_build_at_hnsw_max_min_linear_estimate": round(per_vector_s * chosen.hnsw_max
                                                            / 60, 1),
        "ivfpq_bytes_per_vector": result["ivfpq_model2vec_vectors"][0]["bytes_per_vector"],
    }
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
