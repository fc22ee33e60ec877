"""One rank of a two-node checkpoint, as a process: for test_node_checkpoints.py.

    RANK=r WORLD_SIZE=2 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=p \\
        python -m tests.services.trainer.node_checkpoint_ranks SCENARIO ROOT

Each rank is a node of its own (LOCAL_RANK 0) with its own disk, `ROOT/node<r>`,
and both share the object store `ROOT/bucket` (fsspec on a file:// URL, the code
path of s3://); the process group is gloo. The rank writes `ROOT/rank<r>.json`:
its outcome (the checkpoint's digest on rank 0, or the error it stopped with) and
the pickled size of every object it handed to torch.distributed's object
collectives, which is all that crosses the process group besides tensors.

Scenarios:
- `save`: node 1's directory holds what a crashed save at the same step left (a
  stale marker, a stale file, an old version of a file); both ranks write and the
  checkpoint is stored (node 1's optimizer file is FILE_BYTES large).
- `fetch-fails`: resuming, node 1 cannot get the checkpoint (neither its disk nor
  the object store has it). The failed rank then keeps its process, and so its
  process group, alive, as a rank whose peers use NCCL does for them: NCCL does not
  notice a dead peer, and the others would wait at a barrier until its timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lmforge.artifacts import ArtifactStore
from lmforge.object_store import RemoteArtifacts
from services.trainer.node_checkpoints import (
    checkpoint_on_this_node,
    make_checkpoint_dir,
    store_checkpoint,
)

FILE_BYTES = 4 << 20
"""Node 1's optimizer file: what must not cross the process group."""
LINGER_S = 60.0
PROCESS_GROUP_TIMEOUT_S = 60.0
WORK = Path("tmp") / "ckpt-run-2"
"""The checkpoint directory, relative to each node's store, as the trainer names it."""

sent_sizes: list[int] = []


def _recording(name: str, sent_arg: int) -> None:
    """Wrap an object collective of torch.distributed to record what this rank sends."""
    original = getattr(dist, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sent_sizes.append(len(pickle.dumps(args[sent_arg])))
        return original(*args, **kwargs)

    setattr(dist, name, wrapper)


def save(rank: int, store: ArtifactStore) -> dict[str, Any]:
    work = store.root / WORK
    if rank == 1:  # a crashed save at the same step left these
        work.mkdir(parents=True)
        (work / ".rank0-disk").write_text("token of an earlier save")
        (work / "stale-from-a-crashed-save.bin").write_bytes(b"stale")
        (work / "optim-rank1.bin").write_bytes(b"old")
    directory = make_checkpoint_dir(work, rank, 2)
    if rank == 0:
        (work / "trainer_state.json").write_text('{"step": 2}')
        (work / "model").mkdir()
        (work / "model" / "weights.bin").write_bytes(b"w" * 1000)
    (work / f"rng-rank{rank}.pt").write_bytes(bytes([rank]) * 100)
    optimizer = os.urandom(FILE_BYTES)
    if rank == 1:
        (work / "optim-rank1.bin").write_bytes(optimizer)
    stored = store_checkpoint(store, directory, rank, 2)
    return {"digest": stored.digest if stored else None,
            "size_bytes": stored.size_bytes if stored else None,
            "optimizer_sha256": hashlib.sha256(optimizer).hexdigest(),
            "work_left": work.exists()}


def fetch_fails(rank: int, store: ArtifactStore, root: Path) -> dict[str, Any]:
    digest = None
    if rank == 0:  # on rank 0's disk only: never uploaded
        source = root / "node0-checkpoint"
        source.mkdir()
        (source / "trainer_state.json").write_text('{"step": 2}')
        digest = ArtifactStore(store.root).put_dir(source).digest
    box = [digest]
    dist.broadcast_object_list(box, src=0)
    path = checkpoint_on_this_node(store, str(box[0]), 2)
    return {"path": str(path)}


def main(scenario: str, root: Path) -> None:
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
    for name, sent_arg in (("gather_object", 0), ("broadcast_object_list", 0),
                           ("all_gather_object", 1)):
        _recording(name, sent_arg)
    store = ArtifactStore(root / f"node{rank}" / "artifacts",
                          remote=RemoteArtifacts((root / "bucket").as_uri()))
    outcome: dict[str, Any]
    failed = False
    started = time.monotonic()
    try:
        outcome = save(rank, store) if scenario == "save" else fetch_fails(rank, store, root)
    except Exception as exc:
        failed = True
        outcome = {"error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()}
    outcome.update(sent_sizes=sent_sizes, seconds=time.monotonic() - started)
    result = root / f"rank{rank}.json"
    result.with_suffix(".tmp").write_text(json.dumps(outcome))
    result.with_suffix(".tmp").replace(result)
    if failed and scenario == "fetch-fails":
        time.sleep(LINGER_S)
    if not failed:
        dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # no gloo teardown (see services/trainer/worker.py)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
