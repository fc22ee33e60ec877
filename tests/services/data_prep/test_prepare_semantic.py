"""The semantic stage inside the pipeline: weights reach the packed dataset, a copy of a
held-out document leaves the training split, and the saved index answers a search."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from services.data_prep.cleaning import document_digest, is_heldout, normalize_text
from services.data_prep.prepare import PrepConfig, prepare_dataset
from services.data_prep.semantic import SemanticConfig
from tests.conftest import TEST_DATA

pytestmark = pytest.mark.embeddings


def _heldout_moon(fraction: float) -> str:
    """A wording of the moon saying that the split's hash puts in the held-out part."""
    for subject, earth, far, verb in itertools.product(
            ["The moon", "The Moon"], ["Earth", "the Earth"], ["further", "farther"],
            ["it's", "it is"]):
        text = f"{subject} may be smaller than {earth}, but {verb} {far} away."
        if is_heldout(document_digest(normalize_text(text)), fraction):
            return text
    raise AssertionError("no wording lands in the held-out part")


def test_weights_decontamination_and_search_through_prepare(tmp_path):
    config = PrepConfig(vocab_size=1024, seq_len=64, semantic=SemanticConfig())
    held = _heldout_moon(config.heldout_fraction)
    paraphrase = "Although the moon is smaller than the earth, it is farther away."
    assert not is_heldout(document_digest(paraphrase), config.heldout_fraction)
    data = tmp_path / "fortunes.txt"
    data.write_text((TEST_DATA / "fortunes-sample.txt").read_text(encoding="utf-8")
                    + f"%\n{held}\n%\n{paraphrase}\n", encoding="utf-8")
    stats = prepare_dataset(data, "text", "", tmp_path / "ds", config,
                            kept_path=tmp_path / "kept.jsonl")
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert meta["train"]["weighted"] and meta["train"]["documents"] == stats.train_documents
    weights = [d["weight"] for d in map(json.loads, (tmp_path / "kept.jsonl").open())
               if d["split"] == "train"]
    assert min(weights) < 1.0 < max(weights) <= 3.0 + 1e-6  # the rare clusters up, at most 3x
    assert stats.tallies["semantic.clusters"] > 1
    # The planted paraphrase of a held-out text leaves the training split, and is counted.
    assert stats.count("semantic.contaminates_heldout") >= 1
    texts = {d["text"]: d["split"] for d in map(json.loads, (tmp_path / "kept.jsonl").open())}
    assert texts[held] == "heldout" and paraphrase not in texts

    kept = [d for d in map(json.loads, (tmp_path / "kept.jsonl").open()) if d["split"] == "train"]
    probe = kept[len(kept) // 2]
    done = subprocess.run([sys.executable, "-m", "services.data_prep.search",
                           str(tmp_path / "ds" / "semantic_index"), probe["text"], "-k", "3",
                           "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    hits = json.loads(done.stdout)
    assert hits[0]["doc_id"] == probe["id"] and hits[0]["score"] > 0.9
