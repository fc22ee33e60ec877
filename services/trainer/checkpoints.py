"""Checkpoints: stored as content-addressed artifacts, indexed per run.

A checkpoint holds the model weights (safetensors), the optimizer, scheduler
and RNG states (a torch file loaded with `weights_only=True`, so nothing is
unpickled beyond tensors and plain containers) and the step. The run's index
(`<home>/checkpoints/<run_id>.json`) lists the last K checkpoints and is
replaced atomically (write, fsync, rename). On resume the newest checkpoint
whose digests verify is used; a corrupt one is skipped with a warning.

With an object store behind the artifact store (LMFORGE_ARTIFACT_URL), each
checkpoint is uploaded as it is stored and the index is also written there
(`runs/<run_id>/checkpoints.json`), so a trainer on another machine, with its
own LMFORGE_HOME, finds the newest checkpoint, downloads and verifies it, and
resumes exactly where the preempted one stopped.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lmforge.artifacts import ArtifactError, ArtifactStore
from lmforge.object_store import ObjectStoreError

log = logging.getLogger("lmforge.trainer.checkpoints")

REMOTE_INDEX = "checkpoints"
"""The run's checkpoint index in the object store: runs/<run_id>/checkpoints.json."""


@dataclass(frozen=True, slots=True)
class CheckpointRef:
    step: int
    digest: str
    seconds: float = 0.0
    """Measured wall time to write and store it (0 where not measured, e.g. read back)."""
    size_bytes: int = 0
    next_interval: int = 0
    """Steps to the next checkpoint, as re-planned from the measured cost (0 = unchanged)."""


class CheckpointIndex:
    def __init__(self, root: Path, run_id: str, store: ArtifactStore, keep: int = 3) -> None:
        self.run_id = run_id
        self.path = root / f"{run_id}.json"
        self.store = store
        self.keep = keep
        root.mkdir(parents=True, exist_ok=True)

    def entries(self) -> list[CheckpointRef]:
        """This machine's index merged with the object store's (newer steps from either)."""
        found: dict[int, CheckpointRef] = {}
        if self.path.exists():
            for e in json.loads(self.path.read_text())["checkpoints"]:
                found[e["step"]] = CheckpointRef(e["step"], e["digest"])
        if self.store.remote is not None:
            remote = self.store.remote.read_document(self.run_id, REMOTE_INDEX)
            for e in (remote or {}).get("checkpoints", []):
                found.setdefault(e["step"], CheckpointRef(e["step"], e["digest"]))
        return [found[step] for step in sorted(found)]

    def add(self, ref: CheckpointRef) -> None:
        entries = [e for e in self.entries() if e.step != ref.step] + [ref]
        entries.sort(key=lambda e: e.step)
        dropped, kept = entries[: -self.keep], entries[-self.keep :]
        document = {"checkpoints": [{"step": e.step, "digest": e.digest} for e in kept]}
        tmp = self.path.with_suffix(".json.tmp")
        with tmp.open("w") as f:
            json.dump(document, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
        if self.store.remote is not None:
            self.store.remote.write_document(self.run_id, REMOTE_INDEX, document)
        for old in dropped:
            try:
                self.store.delete(old.digest)
            except (ArtifactError, ObjectStoreError) as exc:
                log.warning("old checkpoint at step %d not deleted: %s", old.step, exc)

    def latest_good(self) -> tuple[CheckpointRef, Path] | None:
        """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
        for ref in reversed(self.entries()):
            try:
                return ref, self.store.get_dir(ref.digest, verify=True)
            except ArtifactError as exc:
                log.warning("checkpoint at step %d refused: %s; trying the previous one",
                            ref.step, exc)
        return None
