"""The artifact store's remote tier against a real S3-protocol server on 127.0.0.1."""

from __future__ import annotations

import pytest

from lmforge.artifacts import ArtifactError, ArtifactStore
from lmforge.object_store import MANIFEST, RemoteArtifacts

pytestmark = pytest.mark.servers


def _dir(tmp_path, name, files):
    d = tmp_path / name
    for rel, content in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(content)
    return d


def test_an_artifact_stored_on_one_machine_is_fetched_and_verified_on_another(tmp_path, s3):
    url = s3.url("lmforge")
    here = ArtifactStore(tmp_path / "home-a", remote=RemoteArtifacts(url))
    stored = here.put_dir(_dir(tmp_path, "ckpt", {"model.safetensors": b"w" * 5000,
                                                  "state/rng.pt": b"r" * 10}))
    there = ArtifactStore(tmp_path / "home-b", remote=RemoteArtifacts(url))
    assert not there.exists(stored.digest)
    path = there.get_dir(stored.digest)
    assert (path / "state" / "rng.pt").read_bytes() == b"r" * 10
    assert there.exists(stored.digest)  # kept: the next read is local
    keys = {o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.name)["Contents"]}
    assert f"lmforge/sha256/{stored.digest[7:]}/{MANIFEST}" in keys


def test_a_corrupt_remote_copy_is_refused_and_an_unfinished_upload_is_not_there(tmp_path, s3):
    url = s3.url("p")
    here = ArtifactStore(tmp_path / "a", remote=RemoteArtifacts(url))
    stored = here.put_dir(_dir(tmp_path, "x", {"weights.bin": b"\x00" * 64}))
    s3.put(f"p/sha256/{stored.digest[7:]}/weights.bin", b"\x00" * 63 + b"\x01")
    there = ArtifactStore(tmp_path / "b", remote=RemoteArtifacts(url))
    with pytest.raises(ArtifactError, match="corrupt"):
        there.get_dir(stored.digest)
    assert not there.exists(stored.digest)  # nothing half-checked is kept

    unfinished = here.put_dir(_dir(tmp_path, "y", {"weights.bin": b"y"}))
    s3.client.delete_object(Bucket=s3.name, Key=f"p/sha256/{unfinished.digest[7:]}/{MANIFEST}")
    remote = RemoteArtifacts(url)
    assert not remote.has(unfinished.digest)
    here.put_dir(_dir(tmp_path, "y2", {"weights.bin": b"y"}))  # the same content: uploaded again
    assert remote.has(unfinished.digest)


def test_a_missing_artifact_names_the_store_and_the_url(tmp_path, s3):
    store = ArtifactStore(tmp_path / "a", remote=RemoteArtifacts(s3.url("empty")))
    with pytest.raises(ArtifactError, match=f"nor fetchable: s3://{s3.name}/empty"):
        store.get_dir("sha256:" + "1" * 64)


def test_an_unwritable_remote_fails_the_put_loudly(tmp_path, s3):
    from lmforge.object_store import ObjectStoreError

    store = ArtifactStore(tmp_path / "a", remote=RemoteArtifacts("s3://no-such-bucket-xyz/p"))
    with pytest.raises(ObjectStoreError, match="no-such-bucket-xyz"):
        store.put_dir(_dir(tmp_path, "z", {"f": b"1"}))
