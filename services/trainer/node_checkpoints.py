"""Checkpoints written and read by ranks on nodes that may share no disk.

Under local torchrun every rank writes into one directory that rank 0 then stores.
In a Kubernetes Job (kubernetes_launcher.py) each pod's LMFORGE_HOME is its own
emptyDir: a rank on node 1 cannot write into rank 0's directory, and cannot read
the checkpoint rank 0 fetched to resume from. So:

- Saving: rank 0 empties the directory and leaves a marker in it holding a token
  new for this save, which it broadcasts; a rank that does not find that token is on
  another disk, where the node's LOCAL_RANK 0 (set by torchrun) empties the
  directory before anyone writes (a crashed save at the same step, or an old marker,
  leaves nothing behind that counts). After the ranks wrote, each such node
  describes the files rank 0 lacks (name, size, sha256); rank 0 adds them to its
  own files' manifest, whose digest is the checkpoint's address; every node
  uploads its own files under that address in the object store, straight from its
  disk, and rank 0 writes the manifest last (lmforge.object_store). Only names and
  digests cross the process group, never a file. On one shared disk nothing is
  described and rank 0 stores the directory as before.
- Resuming: rank 0 names the checkpoint by digest; one rank per node gets it from
  its own artifact store, which downloads and verifies it from the object store
  when the node does not hold it, before the node's other ranks read it.

Each step that ends in a barrier ends instead in `together`: every rank says
whether its part failed (one all-reduced flag), and when one did every rank raises
`RankFailed` with the failed ranks' reasons, at once, instead of the others
waiting at the barrier for a rank that will never come (until the process group's
timeout: NCCL does not notice a dead peer). The control messages go through a
gloo group, so under NCCL they stay off the GPU.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple, TypeVar, cast

import torch
import torch.distributed as dist

from lmforge.artifacts import ArtifactStore, build_manifest, manifest_digest

log = logging.getLogger("lmforge.trainer.node_checkpoints")

RANK0_DISK = ".rank0-disk"
"""Written by rank 0 in the checkpoint directory, holding this save's token; removed
before the directory is stored."""

T = TypeVar("T")


class RankFailed(RuntimeError):
    """A step every rank takes together failed on some rank: raised on all of them,
    naming each failed rank and why."""


class StoredCheckpoint(NamedTuple):
    digest: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class CheckpointDir:
    path: Path
    on_rank0_disk: bool
    """False: this rank's node has its own disk and uploads its own files."""


@dataclass
class _Assembly:
    """Rank 0's plan for a checkpoint written on several disks (names and digests)."""

    digest: str
    manifest: dict[str, Any]
    there: bool
    """The object store holds this very checkpoint already: nothing is uploaded."""
    uploads: dict[int, list[str]] = field(default_factory=dict)
    """rank -> the files it uploads from its node's disk."""


_control: list[dist.ProcessGroup | None] = []


def local_rank() -> int:
    """This rank's place on its node (torchrun's LOCAL_RANK; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def _group() -> dist.ProcessGroup | None:
    """The group for control messages: the default one under gloo, else a gloo group
    made once (every rank reaches its first collective here in the same order)."""
    if not _control:
        _control.append(None if dist.get_backend() == "gloo"
                        else dist.new_group(backend="gloo"))
    return _control[0]


def agree(what: str, failure: str, world_size: int) -> None:
    """A barrier that carries each rank's outcome: returns when `failure` is empty on
    every rank, else raises RankFailed on every rank with the failed ones' reasons."""
    if world_size == 1:
        if failure:
            raise RankFailed(f"{what} failed: {failure}")
        return
    group = _group()
    failed = torch.tensor([1 if failure else 0], dtype=torch.int32)
    dist.all_reduce(failed, group=group)
    if int(failed.item()) == 0:
        return
    reasons: list[str | None] = [None] * world_size
    dist.all_gather_object(reasons, failure, group=group)
    raise RankFailed(f"{what} failed on " + "; ".join(
        f"rank {rank}: {reason}" for rank, reason in enumerate(reasons) if reason))


@contextmanager
def together(what: str, world_size: int) -> Iterator[None]:
    """Run the block on every rank, then `agree` on how it went (a barrier): an
    exception on any rank is raised on all of them as RankFailed, at once. One rank
    alone raises the block's own exception."""
    if world_size == 1:
        yield
        return
    caught: Exception | None = None
    try:
        yield
    except Exception as exc:  # every failure is the other ranks' business: agreed below
        log.exception("rank %d: %s failed", dist.get_rank(), what)
        caught = exc
    try:
        agree(what, f"{type(caught).__name__}: {caught}" if caught else "", world_size)
    except RankFailed as failed:
        raise failed from caught


def _from_rank0(value: T) -> T:
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0, group=_group())
    return cast(T, box[0])


def make_checkpoint_dir(work: Path, rank: int, world_size: int) -> CheckpointDir:
    """An empty `work` on this rank's disk, for this save only."""
    token = ""
    with together("making the checkpoint directory", world_size):
        if rank == 0:
            token = secrets.token_hex(16)
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            (work / RANK0_DISK).write_text(token)
    if world_size == 1:
        return CheckpointDir(work, on_rank0_disk=True)
    token = _from_rank0(token)
    on_rank0_disk = _read_marker(work) == token
    with together("emptying the checkpoint directory of nodes without rank 0's disk",
                  world_size):
        if not on_rank0_disk and local_rank() == 0:
            shutil.rmtree(work, ignore_errors=True)  # an earlier save's files, or marker
            work.mkdir(parents=True)
    work.mkdir(parents=True, exist_ok=True)
    return CheckpointDir(work, on_rank0_disk)


def store_checkpoint(store: ArtifactStore, directory: CheckpointDir, rank: int,
                     world_size: int) -> StoredCheckpoint | None:
    """After every rank wrote its files: the checkpoint stored as one artifact (and
    uploaded where the store has an object store); its address on rank 0, else None."""
    work = directory.path
    held: list[str] = []
    with together("listing the checkpoint's files", world_size):
        if rank == 0:
            (work / RANK0_DISK).unlink()
            held = _files(work)
    if world_size == 1:
        stored = store.put_dir(work, move=True)
        return StoredCheckpoint(stored.digest, stored.size_bytes)

    held_names = set(_from_rank0(held))
    sender = not directory.on_rank0_disk and local_rank() == 0
    entries: list[dict[str, Any]] = []
    with together("describing the checkpoint files of nodes without rank 0's disk",
                  world_size):
        if sender:
            if store.remote is None:
                raise RuntimeError(
                    "this node does not share rank 0's disk and the job names no object "
                    "store (artifact_url) for its checkpoint files")
            entries = [e for e in build_manifest(work)["files"] if e["path"] not in held_names]
    described = _gather_on_rank0(entries, world_size)
    plan: _Assembly | None = None
    with together("assembling the checkpoint's manifest", world_size):
        if rank == 0 and any(described[1:]):
            plan = _assemble(store, build_manifest(work), described)
    plan = _from_rank0(plan)

    if plan is None:  # one shared disk: rank 0 holds every file
        stored_here = None
        with together("storing the checkpoint", world_size):
            if rank == 0:
                stored = store.put_dir(work, move=True)
                stored_here = StoredCheckpoint(stored.digest, stored.size_bytes)
        return stored_here

    with together("uploading the checkpoint's files from each node", world_size):
        if not plan.there and plan.uploads.get(rank):
            assert store.remote is not None  # refused above when a sender has none
            store.remote.upload_files(plan.digest, work, plan.uploads[rank])
    with together("completing the checkpoint in the object store", world_size):
        if rank == 0 and not plan.there:
            assert store.remote is not None
            store.remote.complete(plan.digest, plan.manifest)
    if rank == 0 or sender:
        shutil.rmtree(work, ignore_errors=True)
    if rank != 0:
        return None
    return StoredCheckpoint(plan.digest, sum(int(e["size"]) for e in plan.manifest["files"]))


def checkpoint_on_this_node(store: ArtifactStore, digest: str, world_size: int) -> Path:
    """The stored checkpoint `digest` on this rank's disk, fetched once per node."""
    with together(f"fetching checkpoint {digest}", world_size):
        if local_rank() == 0:
            store.get_dir(digest, verify=False)  # a download is verified all the same
    return store.get_dir(digest, verify=False)


def _assemble(store: ArtifactStore, own: dict[str, Any],
              described: list[list[dict[str, Any]]]) -> _Assembly:
    """The manifest of rank 0's files plus the ones the other nodes described, in
    build_manifest's order (so the same files get the same address), and who uploads
    which file. Two nodes with different contents for one name are refused."""
    files = {e["path"]: e for e in own["files"]}
    uploads: dict[int, list[str]] = {0: sorted(files)}
    owner: dict[str, int] = {}
    for rank, entries in enumerate(described[1:], start=1):
        for entry in entries:
            name = entry["path"]
            if name in owner:
                if files[name]["sha256"] != entry["sha256"]:
                    raise RuntimeError(f"ranks {owner[name]} and {rank} wrote different "
                                       f"checkpoint files {name}")
                continue
            owner[name] = rank
            files[name] = entry
            uploads.setdefault(rank, []).append(name)
    manifest = {"version": own["version"],
                "files": sorted(files.values(), key=lambda e: PurePosixPath(e["path"]))}
    digest = manifest_digest(manifest)
    assert store.remote is not None  # a node that described files has one (same job)
    return _Assembly(digest, manifest, store.remote.has(digest), uploads)


def _gather_on_rank0(entries: list[dict[str, Any]], world_size: int
                     ) -> list[list[dict[str, Any]]]:
    gathered: list[Any] | None = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(entries, gathered, dst=0, group=_group())
    return [part or [] for part in gathered or []]


def _read_marker(work: Path) -> str:
    """The token in `work`'s marker; "" when there is none (or it is being removed)."""
    try:
        return (work / RANK0_DISK).read_text()
    except OSError:
        return ""


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
