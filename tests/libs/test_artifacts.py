from __future__ import annotations

import pytest

from lmforge.artifacts import ArtifactError, ArtifactStore


def _make(tmp_path, name, files):
    d = tmp_path / name
    for rel, content in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(content)
    return d


def test_same_content_same_address_and_put_is_idempotent(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    a = store.put_dir(_make(tmp_path, "a", {"x.bin": b"1", "sub/y.txt": b"2"}))
    b = store.put_dir(_make(tmp_path, "b", {"sub/y.txt": b"2", "x.bin": b"1"}))
    c = store.put_dir(_make(tmp_path, "c", {"x.bin": b"1", "sub/y.txt": b"3"}))
    assert a.digest == b.digest != c.digest
    assert (store.get_dir(a.digest) / "sub" / "y.txt").read_bytes() == b"2"


def test_flipped_byte_is_refused_on_read(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    stored = store.put_dir(_make(tmp_path, "a", {"weights.safetensors": b"\x00" * 64}))
    (stored.path / "weights.safetensors").write_bytes(b"\x00" * 63 + b"\x01")
    with pytest.raises(ArtifactError, match="corrupt"):
        store.get_dir(stored.digest)


def test_malformed_and_missing_digests_are_clear_errors(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(ArtifactError, match="malformed"):
        store.get_dir("sha256:../../etc")
    with pytest.raises(ArtifactError, match="not in the store"):
        store.get_dir("sha256:" + "0" * 64)
