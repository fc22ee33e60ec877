"""Content-addressed artifact store.

An artifact is a directory. Its address is `sha256:<hex>` of a canonical
manifest listing every file's relative path, size and sha256, so the same
content always lands at the same address: a stage that redoes its work on
unchanged input finds its output already there. Every read checks the
manifest and each file's digest, so a flipped bit is refused, not loaded.

The default backend is a local directory (LMFORGE_HOME/artifacts). Writes
are atomic: files are copied into a temporary directory on the same file
system, fsynced and renamed into place. With a remote tier
(`lmforge.object_store`, LMFORGE_ARTIFACT_URL) every artifact stored is also
uploaded, and one missing locally is downloaded, verified and kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmforge.object_store import RemoteArtifacts

MANIFEST = "MANIFEST.json"
_CHUNK = 1 << 20


class ArtifactError(Exception):
    """An artifact is missing or does not match its digest."""


@dataclass(frozen=True, slots=True)
class StoredArtifact:
    digest: str
    path: Path
    size_bytes: int


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(directory: Path) -> dict:
    """The canonical manifest of `directory` (every regular file, sorted)."""
    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST:
            continue
        if path.is_symlink():
            raise ArtifactError(f"refusing to store symlink {path} in an artifact")
        files.append({"path": rel, "size": path.stat().st_size, "sha256": file_sha256(path)})
    return {"version": 1, "files": files}


def manifest_digest(manifest: dict) -> str:
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class ArtifactStore:
    """A local, content-addressed directory store, with an optional remote tier."""

    def __init__(self, root: Path, remote: RemoteArtifacts | None = None) -> None:
        self.root = Path(root).resolve()
        self.remote = remote
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    def _location(self, digest: str) -> Path:
        algo, _, hexdigest = digest.partition(":")
        if algo != "sha256" or len(hexdigest) != 64 or not all(
            c in "0123456789abcdef" for c in hexdigest
        ):
            raise ArtifactError(f"malformed artifact digest {digest!r}; want 'sha256:<64 hex>'")
        return self.root / "sha256" / hexdigest

    def scratch_dir(self, prefix: str = "work-") -> Path:
        """A fresh directory on the store's file system, for building an artifact."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.root / "tmp"))

    def put_dir(self, source: Path, *, move: bool = False) -> StoredArtifact:
        """Store the directory `source`; return its address. Idempotent."""
        source = Path(source)
        if not source.is_dir():
            raise ArtifactError(f"artifact source {source} is not a directory")
        manifest = build_manifest(source)
        digest = manifest_digest(manifest)
        size = sum(f["size"] for f in manifest["files"])
        target = self._location(digest)
        if target.exists():
            if move:
                shutil.rmtree(source, ignore_errors=True)
            self._mirror(digest, target)
            return StoredArtifact(digest, target, size)
        staging = self.scratch_dir("put-")
        try:
            payload = staging / "payload"
            if move and source.resolve().parent == (self.root / "tmp").resolve():
                source.rename(payload)
            else:
                shutil.copytree(source, payload)
            (payload / MANIFEST).write_text(json.dumps(manifest, sort_keys=True, indent=1))
            _fsync_tree(payload)
            try:
                payload.rename(target)
            except OSError:
                if not target.exists():  # lost a race only if someone else stored it
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if move and source.exists():
                shutil.rmtree(source, ignore_errors=True)
        self._mirror(digest, target)
        return StoredArtifact(digest, target, size)

    def _mirror(self, digest: str, location: Path) -> None:
        """Upload to the remote tier unless it is there already. A failure is raised
        (ObjectStoreError): work whose output another machine cannot read is not done."""
        if self.remote is not None and not self.remote.has(digest):
            self.remote.upload(digest, location)

    def exists(self, digest: str) -> bool:
        return (self._location(digest) / MANIFEST).is_file()

    def get_dir(self, digest: str, *, verify: bool = True) -> Path:
        """The directory holding `digest`, checked file by file unless verify=False;
        fetched from the remote tier (and always verified) if it is only there."""
        location = self._location(digest)
        manifest_path = location / MANIFEST
        if not manifest_path.is_file() and self.remote is not None:
            self._fetch(digest, location)
            return location
        if not manifest_path.is_file():
            raise ArtifactError(f"artifact {digest} is not in the store at {self.root}")
        if verify:
            self.verify(digest)
        return location

    def delete(self, digest: str) -> None:
        """Remove an artifact here and from the remote tier (old checkpoints)."""
        shutil.rmtree(self._location(digest), ignore_errors=True)
        if self.remote is not None:
            self.remote.delete(digest)

    def _fetch(self, digest: str, location: Path) -> None:
        from lmforge.object_store import ObjectStoreError

        assert self.remote is not None
        staging = self.scratch_dir("fetch-")
        try:
            payload = staging / "payload"
            payload.mkdir()
            try:
                self.remote.download(digest, payload)
            except ObjectStoreError as exc:
                raise ArtifactError(f"artifact {digest} is neither in the store at "
                                    f"{self.root} nor fetchable: {exc}") from exc
            self._verify_at(digest, payload)
            _fsync_tree(payload)
            try:
                payload.rename(location)
            except OSError:
                if not (location / MANIFEST).is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def verify(self, digest: str) -> None:
        self._verify_at(digest, self._location(digest))

    def _verify_at(self, digest: str, location: Path) -> None:
        try:
            manifest = json.loads((location / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"artifact {digest}: unreadable manifest ({exc})") from exc
        if manifest_digest(manifest) != digest:
            raise ArtifactError(f"artifact {digest}: manifest does not match its address")
        for entry in manifest["files"]:
            path = location / entry["path"]
            if not path.is_file():
                raise ArtifactError(f"artifact {digest}: file {entry['path']} is missing")
            actual = file_sha256(path)
            if actual != entry["sha256"]:
                raise ArtifactError(
                    f"artifact {digest}: {entry['path']} has sha256 {actual[:12]}…, "
                    f"manifest says {entry['sha256'][:12]}…; the artifact is corrupt"
                )
