"""The artifact store's remote tier: the same content-addressed layout in an object store.

When `LMFORGE_ARTIFACT_URL` names a place another machine can read (`s3://bucket/prefix`,
or any fsspec URL: `gs://`, `file:///shared/...`), every artifact stored locally is also
uploaded there, and an artifact missing locally is downloaded from there and verified
before use. That is what lets a trainer on another machine (another LMFORGE_HOME)
resume a preempted run: the checkpoints and the dataset are found by digest.

Layout under the URL: `sha256/<hex>/<files...>` with `MANIFEST.json` written last, so
an artifact whose manifest is present is complete (an upload cut short leaves no
manifest and is simply uploaded again), and `runs/<run_id>/<name>.json` for small
mutable documents such as a run's checkpoint index.

S3 credentials and the endpoint come from the standard AWS environment (AWS_ACCESS_KEY_ID,
AWS_ENDPOINT_URL, ...) or `endpoint_url` (LMFORGE_ARTIFACT_S3_ENDPOINT_URL), through
s3fs; other schemes through fsspec's own implementations.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("lmforge.object_store")

MANIFEST = "MANIFEST.json"


class ObjectStoreError(Exception):
    """The remote tier could not be read or written (named URL and cause)."""


@dataclass(frozen=True, slots=True)
class Transfer:
    """One upload or download: for the log and the spot benchmark's MB/s."""

    digest: str
    bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")


class RemoteArtifacts:
    """An fsspec file system and a root URL holding artifacts by digest."""

    def __init__(self, url: str, *, endpoint_url: str = "") -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.endpoint_url = endpoint_url
        scheme = self.url.split("://", 1)[0] if "://" in self.url else "file"
        options: dict[str, Any] = {}
        if scheme == "s3":
            # No listing cache: another trainer's upload must be visible at once.
            options = {"skip_instance_cache": True, "use_listings_cache": False}
            if endpoint_url:
                options["endpoint_url"] = endpoint_url
        elif scheme == "file":
            options = {"auto_mkdir": True}
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        except (ImportError, ValueError) as exc:
            raise ObjectStoreError(f"artifact URL {self.url}: {exc}") from exc
        self.root = self.root.rstrip("/")
        self.last_transfer: Transfer | None = None

    def _key(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    @staticmethod
    def _hex(digest: str) -> str:
        return digest.partition(":")[2]

    def has(self, digest: str) -> bool:
        try:
            return bool(self.fs.exists(self._key("sha256", self._hex(digest), MANIFEST)))
        except OSError as exc:
            raise ObjectStoreError(f"{self.url}: cannot check {digest}: {exc}") from exc

    def upload(self, digest: str, directory: Path) -> Transfer:
        """Upload a stored artifact's files, the manifest last (idempotent)."""
        names = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                       if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST)
        transfer = self.upload_files(digest, directory, names)
        self.complete(digest, json.loads((directory / MANIFEST).read_text()))
        return transfer

    def upload_files(self, digest: str, directory: Path, names: list[str]) -> Transfer:
        """Upload files of `directory` under the address `digest`, without a manifest:
        the artifact is not complete (not `has`) until `complete` writes it. Several
        machines may each upload their part of one artifact this way, straight from
        their own disks (node_checkpoints.py)."""
        started = time.perf_counter()
        base = self._key("sha256", self._hex(digest))
        size = sum((directory / name).stat().st_size for name in names)
        try:
            # One call for every file: s3fs (and other async file systems) move them
            # concurrently, each streamed from its file, none held whole in memory.
            if names:
                self.fs.put([str(directory / name) for name in names],
                            [f"{base}/{name}" for name in names])
        except OSError as exc:
            raise ObjectStoreError(f"{self.url}: upload of {digest} failed: {exc}") from exc
        transfer = Transfer(digest, size, time.perf_counter() - started)
        self.last_transfer = transfer
        log.info("uploaded %s to %s: %.1f MB in %.2f s (%.1f MB/s)", digest[:19], self.url,
                 size / 1e6, transfer.seconds, transfer.mb_per_s)
        return transfer

    def complete(self, digest: str, manifest: dict[str, Any]) -> None:
        """Write the manifest of an artifact whose files are all uploaded: last, as it
        is what makes the artifact there (`has`) for every reader."""
        try:
            self.fs.pipe_file(self._key("sha256", self._hex(digest), MANIFEST),
                              json.dumps(manifest, sort_keys=True, indent=1).encode())
        except OSError as exc:
            raise ObjectStoreError(f"{self.url}: upload of {digest} failed: {exc}") from exc

    def download(self, digest: str, into: Path) -> Transfer:
        """Download an artifact into the empty directory `into` (the caller verifies it)."""
        started = time.perf_counter()
        base = self._key("sha256", self._hex(digest))
        try:
            manifest = json.loads(self.fs.cat_file(f"{base}/{MANIFEST}"))
            entries = manifest["files"]
            for entry in entries:
                (into / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
            if entries:
                self.fs.get([f"{base}/{entry['path']}" for entry in entries],
                            [str(into / entry["path"]) for entry in entries])
            size = sum(int(entry["size"]) for entry in entries)
        except FileNotFoundError as exc:
            raise ObjectStoreError(f"{self.url}: artifact {digest} is not there ({exc})") from exc
        except (OSError, ValueError, KeyError) as exc:
            raise ObjectStoreError(f"{self.url}: download of {digest} failed: {exc}") from exc
        (into / MANIFEST).write_text(json.dumps(manifest, sort_keys=True, indent=1))
        transfer = Transfer(digest, size, time.perf_counter() - started)
        self.last_transfer = transfer
        log.info("downloaded %s from %s: %.1f MB in %.2f s (%.1f MB/s)", digest[:19], self.url,
                 size / 1e6, transfer.seconds, transfer.mb_per_s)
        return transfer

    def delete(self, digest: str) -> None:
        """Remove an artifact, the manifest first so no reader takes it for complete."""
        base = self._key("sha256", self._hex(digest))
        try:
            if self.fs.exists(f"{base}/{MANIFEST}"):
                self.fs.rm_file(f"{base}/{MANIFEST}")
            if self.fs.exists(base):
                self.fs.rm(base, recursive=True)
        except OSError as exc:
            raise ObjectStoreError(f"{self.url}: delete of {digest} failed: {exc}") from exc

    def read_document(self, run_id: str, name: str) -> Any | None:
        """A run's small JSON document (None if there is none)."""
        key = self._key("runs", run_id, f"{name}.json")
        try:
            return json.loads(self.fs.cat_file(key))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ObjectStoreError(f"{self.url}: cannot read {key}: {exc}") from exc

    def write_document(self, run_id: str, name: str, value: Any) -> None:
        """Replace a run's small JSON document (one PUT: readers see old or new, whole)."""
        key = self._key("runs", run_id, f"{name}.json")
        try:
            self.fs.pipe_file(key, json.dumps(value).encode())
        except OSError as exc:
            raise ObjectStoreError(f"{self.url}: cannot write {key}: {exc}") from exc


def remote_artifacts(url: str, endpoint_url: str = "") -> RemoteArtifacts | None:
    """The remote tier for `url`, or None when it is empty (local disk only)."""
    return RemoteArtifacts(url, endpoint_url=endpoint_url) if url else None
