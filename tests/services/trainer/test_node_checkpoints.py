"""Checkpoints of ranks on two nodes that share no disk, each rank a real process.

The ranks (node_checkpoint_ranks.py) run services/trainer/node_checkpoints.py over
a real gloo process group, each on its own directory as its node's disk, sharing
a real object store (fsspec on a file:// URL). No training runs: the files are
written by the scenario (test_training_pods.py runs the whole trainer so).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lmforge.artifacts import ArtifactStore, build_manifest, file_sha256, manifest_digest
from lmforge.object_store import RemoteArtifacts
from tests.services.trainer.node_checkpoint_ranks import FILE_BYTES

pytestmark = [pytest.mark.distributed, pytest.mark.processes]

REPO = Path(__file__).resolve().parents[3]
PROMPTLY_S = 20.0
"""Well inside the ranks' process group timeout (60 s), including two torch imports
on a busy machine."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ranks(scenario: str, root: Path) -> list[subprocess.Popen[bytes]]:
    port = _free_port()
    return [subprocess.Popen(
        [sys.executable, "-m", "tests.services.trainer.node_checkpoint_ranks", scenario,
         str(root)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": f"{REPO / 'libs'}:{REPO}", "OMP_NUM_THREADS": "1",
             "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        for rank in range(2)]


def _outcome(root: Path, rank: int, deadline: float) -> dict[str, Any]:
    path = root / f"rank{rank}.json"
    while not path.exists():
        assert time.monotonic() < deadline, f"rank {rank} gave no outcome in time"
        time.sleep(0.1)
    return json.loads(path.read_text())


def _run(scenario: str, root: Path, wait_for: list[int]) -> list[dict[str, Any]]:
    processes = _ranks(scenario, root)
    try:
        deadline = time.monotonic() + PROMPTLY_S
        return [_outcome(root, rank, deadline) for rank in wait_for]
    finally:
        for process in processes:
            process.kill()
            process.wait()


def test_node_files_go_to_the_object_store_by_digest_and_stale_ones_are_left_out(
        tmp_path) -> None:
    rank0, rank1 = _run("save", tmp_path, [0, 1])
    assert "error" not in rank0 and "error" not in rank1, rank0.get(
        "traceback") or rank1.get("traceback")

    # the checkpoint, read from the object store alone, holds both nodes' files as
    # written in this save: nothing the crashed save left, not the old marker
    elsewhere = ArtifactStore(tmp_path / "elsewhere",
                              remote=RemoteArtifacts((tmp_path / "bucket").as_uri()))
    path = elsewhere.get_dir(rank0["digest"])  # downloaded and verified
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert files == ["MANIFEST.json", "model/weights.bin", "optim-rank1.bin",
                     "rng-rank0.pt", "rng-rank1.pt", "trainer_state.json"]
    assert file_sha256(path / "optim-rank1.bin") == rank1["optimizer_sha256"]
    assert (path / "rng-rank1.pt").read_bytes() == bytes([1]) * 100
    # the address is the one these files get anywhere (content-addressed as put_dir does)
    assert manifest_digest(build_manifest(path)) == rank0["digest"]
    assert rank0["size_bytes"] == sum(
        (path / name).stat().st_size for name in files if name != "MANIFEST.json")
    assert not rank0["work_left"] and not rank1["work_left"]

    # what crossed the process group: names and digests, not the 4 MiB file
    assert max(rank0["sent_sizes"] + rank1["sent_sizes"]) < 4096 < FILE_BYTES


def test_a_rank_that_cannot_fetch_the_checkpoint_stops_the_others_at_once_with_why(
        tmp_path) -> None:
    (rank0,) = _run("fetch-fails", tmp_path, [0])
    assert rank0["seconds"] < PROMPTLY_S
    assert rank0["error"].startswith("RankFailed: fetching checkpoint sha256:")
    assert "failed on rank 1: ArtifactError: artifact sha256:" in rank0["error"]
    assert "is neither in the store" in rank0["error"]
