"""`lmforge run` against services in containers: host paths become container paths."""

from __future__ import annotations

import pytest

from lmforge.cli.dataset_mounts import UnmountedDataset, container_path
from lmforge.cli.main import main


def test_a_host_path_under_a_mount_becomes_the_container_path(tmp_path):
    data = tmp_path / "data"
    mounts = f"{data}=/data"
    assert container_path(str(data / "corpus.jsonl"), mounts) == "/data/corpus.jsonl"
    assert container_path(str(data / "shards" / "*.jsonl"), mounts) == "/data/shards/*.jsonl"
    assert container_path(str(data), mounts) == "/data"
    assert container_path("s3://bucket/corpus/", mounts) == "s3://bucket/corpus/"
    assert container_path(str(tmp_path / "x.jsonl"), "") == str(tmp_path / "x.jsonl")


def test_a_host_path_outside_every_mount_is_refused_with_the_fix(tmp_path):
    with pytest.raises(UnmountedDataset, match=r"outside every directory mounted into the "
                       r"services \(LMFORGE_DATASET_MOUNTS=.*=/data\): move it under"):
        container_path(str(tmp_path / "elsewhere.jsonl"), f"{tmp_path / 'data'}=/data")
    with pytest.raises(ValueError, match="is not HOST_DIR=/CONTAINER_DIR"):
        container_path(str(tmp_path / "a"), "./data:/data")


def test_lmforge_run_refuses_an_unmounted_dataset_before_publishing(tmp_path, monkeypatch,
                                                                   capsys):
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text('{"text": "hello"}\n')
    monkeypatch.setenv("LMFORGE_DATASET_MOUNTS", f"{tmp_path / 'data'}=/data")
    monkeypatch.setenv("LMFORGE_NATS_URL", "nats://127.0.0.1:1")  # never reached
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    # 2 (usage), not 1 (NATS unreachable): refused before any connection.
    assert main(["run", str(outside), "--model-name", "m"]) == 2
    printed = capsys.readouterr()
    assert "outside every directory mounted" in " ".join((printed.out + printed.err).split())
