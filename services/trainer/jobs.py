"""Running one training job: in this process, or on several ranks under torchrun.

The trainer's handler decides nothing; it hands a `TrainingJob` to
`run_training_job`, which picks the launcher from the plan's world size. Both
paths report progress and checkpoints through the same callbacks and return
the same `TrainResult`, so the handler is the same for one rank or many.

A plan that needs more than one node goes to a `ClusterLauncher` (a Kubernetes
Job or a Kubeflow PyTorchJob, see kubernetes_launcher.py) when the service has
one (LMFORGE_TRAINER_LAUNCHER); the launcher says how many nodes a plan needs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from lmforge.artifacts import ArtifactStore
from services.trainer.checkpoints import CheckpointIndex, CheckpointRef
from services.trainer.config import TrainConfig
from services.trainer.distributed import launch, write_job
from services.trainer.training import Progress, Trainer, TrainResult


@dataclass(kw_only=True, slots=True)
class TrainingJob:
    """One attempt at training a run, with everything it reads and where it writes."""

    run_id: str
    config: TrainConfig
    dataset_dir: Path
    """The verified dataset artifact (token shards and tokenizer)."""
    store: ArtifactStore
    home: Path
    """LMFORGE_HOME: checkpoints and torchrun job files live under it."""
    dataset_digest: str = ""
    """The dataset artifact's digest: what a rank on another machine fetches it by."""
    device: str = "cpu"
    peak_flops: float = 0.0
    """Device peak FLOP/s for MFU; 0 = not reported."""

    @property
    def checkpoint_root(self) -> Path:
        return self.home / "checkpoints"


class ClusterLauncher(Protocol):
    """Runs a job's ranks on several nodes of a cluster, relaying the same callbacks."""

    def nodes_for(self, config: TrainConfig) -> int:
        """Nodes the plan's ranks need (1: they fit on this one)."""
        ...

    def run(self, job: TrainingJob, *, stop: threading.Event,
            on_progress: Callable[[Progress], None],
            on_checkpoint: Callable[[CheckpointRef], None]) -> TrainResult: ...


def run_training_job(job: TrainingJob, *, stop: threading.Event,
                     on_progress: Callable[[Progress], None],
                     on_checkpoint: Callable[[CheckpointRef], None],
                     cluster: ClusterLauncher | None = None) -> TrainResult:
    """Train until done or `stop` is set (then checkpoint and return `preempted`)."""
    config = job.config
    if cluster is not None and cluster.nodes_for(config) > 1:
        return cluster.run(job, stop=stop, on_progress=on_progress,
                           on_checkpoint=on_checkpoint)
    if config.world_size > 1:
        job_file = write_job(job.home / "jobs" / job.run_id, config=config,
                             dataset_dir=job.dataset_dir, store_root=job.store.root,
                             checkpoint_root=job.checkpoint_root, run_id=job.run_id,
                             device=job.device, peak_flops=job.peak_flops,
                             artifact_url=job.store.remote.url if job.store.remote else "",
                             artifact_endpoint_url=(job.store.remote.endpoint_url
                                                    if job.store.remote else ""))
        return launch(job_file, config.world_size, stop=stop, on_progress=on_progress,
                      on_checkpoint=on_checkpoint, log_path=job_file.parent / "ranks.log")
    index = CheckpointIndex(job.checkpoint_root, job.run_id, job.store,
                            keep=config.checkpoint.keep)
    trainer = Trainer(config, job.dataset_dir, job.store, index,
                      device=torch.device(job.device), peak_flops=job.peak_flops)
    return trainer.run(stop=stop, on_progress=on_progress, on_checkpoint=on_checkpoint)
