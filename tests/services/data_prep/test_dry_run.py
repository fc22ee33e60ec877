"""`lmforge prep`: the pipeline as a dry run, through the CLI, with every decision reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

FORTUNE = ("The best way to predict the future is to invent it, said a computer scientist "
           "who had spent too many nights in the laboratory waiting for results.")


def test_prep_writes_the_kept_corpus_and_a_report_of_every_decision(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    docs = [
        {"id": "keep-1", "text": FORTUNE},
        {"id": "near-copy", "text": FORTUNE.replace("too many", "so many")},
        {"id": "pii", "text": "Write to jane.doe@example.com about the invoice, she will "
                              "answer within a day or two at the latest."},
        {"id": "short", "text": "Hi."},
        *({"id": f"doc-{i}", "text": f"Document {i} talks about topic {i * 7} at length, "
                                     f"with words enough to pass every rule of quality {i}."}
          for i in range(30)),
    ]
    (data / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "out"
    env = {**os.environ, "LMFORGE_DATA_ROOTS": str(data), "LMFORGE_DATAPREP_VOCAB_SIZE": "300",
           "LMFORGE_DATAPREP_SEQ_LEN": "32", "LMFORGE_DATAPREP_NEAR_DUP_THRESHOLD": "0.5"}
    done = subprocess.run([sys.executable, "-m", "lmforge.cli.main", "prep", str(data),
                           "--out", str(out), "--json"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)
    assert counts["dropped"]["quality.too_short"] == 1
    assert counts["dropped"]["near_dup.duplicate"] == 1
    assert counts["tallies"]["pii.EMAIL"] == 1

    kept = {d["id"]: d for d in map(json.loads, (out / "kept.jsonl").open())}
    assert "short" not in kept and len(kept) == counts["records_kept"]
    assert "<EMAIL>" in kept["pii"]["text"] and "jane.doe" not in kept["pii"]["text"]
    report = json.loads((out / "report.json").read_text())
    fate = {d["id"]: d for d in report["documents"]}
    assert fate["short"]["reason"] == "quality.too_short" and not fate["short"]["kept"]
    dropped_copy = next(d for d in ("keep-1", "near-copy") if not fate[d]["kept"])
    kept_copy = ({"keep-1", "near-copy"} - {dropped_copy}).pop()
    assert fate[dropped_copy]["reason"] == "near_dup.duplicate"
    assert fate[dropped_copy]["cluster"] == fate[kept_copy]["cluster"] != ""
    assert (out / "dataset" / "dataset.json").exists()


def test_prep_outside_the_roots_is_one_line_and_exit_1(tmp_path):
    env = {**os.environ, "LMFORGE_DATA_ROOTS": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "lmforge.cli.main", "prep", "/etc/passwd",
                           "--out", str(tmp_path / "out")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert "outside the allowed roots" in done.stderr and "Traceback" not in done.stderr


# Starts child processes (engine processes, the CLI, model exports): not in `make unit`.
pytestmark = pytest.mark.processes
