"""Data-prep's memory stays bounded as the corpus grows: embedding vectors are spooled
to disk and read a slice at a time, and near-dup frees its signatures once written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from services.data_prep.documents import DecisionLog, Document
from services.data_prep.near_dup import NearDupConfig, NearDupStage, SignatureIndex
from services.data_prep.vector_spool import VectorSpool, batches

ROOT = Path(__file__).resolve().parents[3]


def test_a_spool_gives_back_the_rows_it_was_given_by_slice_and_by_index(tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((50_000, 24)).astype(np.float32)
    spool = VectorSpool(24, tmp_path)
    for start in range(0, len(rows), 7_000):
        spool.append(rows[start : start + 7_000])
    assert len(spool) == len(rows)
    assert np.array_equal(np.concatenate([r for _, r in batches(spool, 4_096)]), rows)
    picked = rng.integers(0, len(rows), 9_000)
    assert np.array_equal(spool.take(picked), rows[picked])
    assert np.array_equal(spool.rows(49_990, 60_000), rows[49_990:])
    # Unnamed: nothing is left in the directory, even while it is open.
    assert list(tmp_path.iterdir()) == []
    spool.close()


_CURATE_RSS = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from services.data_prep.documents import DecisionLog, Document
    from services.data_prep.semantic import SemanticConfig, curate

    class HashEmbedder:
        # A stand-in for the model: this measures what the stage keeps, not the model.
        name, dim = "stand-in", 384
        def encode(self, texts):
            rng = np.random.default_rng(len(texts))
            v = rng.standard_normal((len(texts), self.dim)).astype(np.float32)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

    def corpus(n):
        return lambda: (Document(f"d{i}", f"document {i} words") for i in range(n))

    docs, warm = int(sys.argv[1]), int(sys.argv[2])
    config = SemanticConfig(embedder="minilm", decontaminate=False, max_clusters=16)
    curate(corpus(warm), [], config, DecisionLog(), embedder=HashEmbedder(),
           build_retrieval_index=False)  # warm: faiss, the allocator
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = curate(corpus(docs), [], config, DecisionLog(), embedder=HashEmbedder(),
                    build_retrieval_index=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mb": (after - before) / 1024, "kept": int(result.keep.sum())}))
""")


def _curate_growth_mb(docs: int, warm_docs: int) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "libs")]),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _CURATE_RSS, str(docs), str(warm_docs)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kept"] == docs
    return float(result["growth_mb"])


@pytest.mark.processes  # measures a child process's peak RSS
def test_semantic_curate_memory_does_not_hold_the_vectors():
    # 120k chunks of 384 float32 dims are 176 MiB of vectors, and as many again of
    # document vectors: held in memory (and concatenated) they grew the peak by 503 MiB;
    # spooled, by ~25 MiB (ids, ordinals, labels: ~90 bytes per document).
    growth = _curate_growth_mb(120_000, 20_000)
    assert growth < 80, f"peak RSS grew {growth:.0f} MiB over 120k chunks"


def test_saving_the_updated_index_frees_the_runs_signatures(tmp_path):
    docs = [Document(f"d{i}", f"text number {i} of the corpus, with some words") for i in
            range(200)]
    stage = NearDupStage(NearDupConfig())
    list(stage.run(docs, DecisionLog()))
    expected = stage.updated_index()
    stage.save_updated_index(tmp_path / "index")
    assert stage.result is None
    saved = SignatureIndex.load(tmp_path / "index", NearDupConfig())
    assert saved.ids == expected.ids
    assert np.array_equal(saved.signatures, expected.signatures)
