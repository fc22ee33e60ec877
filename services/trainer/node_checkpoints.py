"""Checkpoints written and read by ranks on nodes that may share no disk.

Under local torchrun every rank writes into one directory that rank 0 then stores.
In a Kubernetes Job (kubernetes_launcher.py) each pod's LMFORGE_HOME is its own
emptyDir: a rank on node 1 cannot write into rank 0's directory, and cannot read
the checkpoint rank 0 fetched to resume from. So:

- Saving: rank 0 makes the directory and leaves a marker in it; a rank that does
  not see the marker is on another disk, makes its own directory and writes there;
  then one rank of each such node (LOCAL_RANK 0, set by torchrun) sends rank 0 the
  files it lacks through the process group, and removes its copy. On one shared
  disk nothing is sent. The files cross in memory, once per node per checkpoint.
- Resuming: rank 0 names the checkpoint by digest; one rank per node gets it from
  its own artifact store, which downloads and verifies it from the object store
  when the node does not hold it, before the node's other ranks read it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist

from lmforge.artifacts import ArtifactStore

RANK0_DISK = ".rank0-disk"
"""Written by rank 0 in the checkpoint directory; removed before the directory is stored."""


def local_rank() -> int:
    """This rank's place on its node (torchrun's LOCAL_RANK; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def make_checkpoint_dir(work: Path, rank: int, world_size: int) -> bool:
    """A fresh `work` on this rank's disk; True when that is rank 0's disk."""
    if rank == 0:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        (work / RANK0_DISK).touch()
    if world_size > 1:
        dist.barrier()
    on_rank0_disk = (work / RANK0_DISK).exists()
    work.mkdir(parents=True, exist_ok=True)
    return on_rank0_disk


def gather_on_rank0(work: Path, *, rank: int, world_size: int, on_rank0_disk: bool) -> None:
    """Every file the ranks wrote under `work`, in rank 0's `work` (after all wrote)."""
    if rank == 0:
        (work / RANK0_DISK).unlink()
    if world_size == 1:
        return
    box: list[list[str] | None] = [_files(work) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    held = set(box[0] or [])
    sender = not on_rank0_disk and local_rank() == 0
    sent = {name: (work / name).read_bytes() for name in _files(work)
            if name not in held} if sender else {}
    gathered: list[dict[str, bytes] | None] | None = [None] * world_size if rank == 0 else None
    dist.gather_object(sent, gathered, dst=0)
    for part in gathered or []:
        for name, data in (part or {}).items():
            if not (work / name).exists():
                (work / name).parent.mkdir(parents=True, exist_ok=True)
                (work / name).write_bytes(data)
    if sender:
        shutil.rmtree(work, ignore_errors=True)


def checkpoint_on_this_node(store: ArtifactStore, digest: str, world_size: int) -> Path:
    """The stored checkpoint `digest` on this rank's disk, fetched once per node."""
    if local_rank() == 0:
        store.get_dir(digest, verify=False)  # a download is verified all the same
    if world_size > 1:
        dist.barrier()
    return store.get_dir(digest, verify=False)


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
