"""Checkpoints: stored as content-addressed artifacts, indexed per run.

A checkpoint holds the model weights (safetensors), the optimizer, scheduler
and RNG states (a torch file loaded with `weights_only=True`, so nothing is
unpickled beyond tensors and plain containers) and the step. The run's index
(`<home>/checkpoints/<run_id>.json`) lists the last K checkpoints and is
replaced atomically (write, fsync, rename). On resume the newest checkpoint
whose digests verify is used; a corrupt one is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from lmforge.artifacts import ArtifactError, ArtifactStore

log = logging.getLogger("lmforge.trainer.checkpoints")


@dataclass(frozen=True, slots=True)
class CheckpointRef:
    step: int
    digest: str


class CheckpointIndex:
    def __init__(self, root: Path, run_id: str, store: ArtifactStore, keep: int = 3) -> None:
        self.run_id = run_id
        self.path = root / f"{run_id}.json"
        self.store = store
        self.keep = keep
        root.mkdir(parents=True, exist_ok=True)

    def entries(self) -> list[CheckpointRef]:
        if not self.path.exists():
            return []
        data = json.loads(self.path.read_text())
        return [CheckpointRef(e["step"], e["digest"]) for e in data["checkpoints"]]

    def add(self, ref: CheckpointRef) -> None:
        entries = [e for e in self.entries() if e.step != ref.step] + [ref]
        entries.sort(key=lambda e: e.step)
        dropped, kept = entries[: -self.keep], entries[-self.keep :]
        tmp = self.path.with_suffix(".json.tmp")
        with tmp.open("w") as f:
            json.dump({"checkpoints": [{"step": e.step, "digest": e.digest} for e in kept]}, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
        for old in dropped:
            with contextlib.suppress(ArtifactError):
                shutil.rmtree(self.store.get_dir(old.digest, verify=False), ignore_errors=True)

    def latest_good(self) -> tuple[CheckpointRef, Path] | None:
        """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
        for ref in reversed(self.entries()):
            try:
                return ref, self.store.get_dir(ref.digest, verify=True)
            except ArtifactError as exc:
                log.warning("checkpoint at step %d refused: %s; trying the previous one",
                            ref.step, exc)
        return None
