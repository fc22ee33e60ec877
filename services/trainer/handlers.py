"""trainer's bus wiring.

training.scheduled -> Trainer.run (in a worker thread) -> model.trained,
with training.progress at most once a second and training.checkpointed after
each checkpoint. SIGTERM (a spot notice) makes the loop checkpoint and stop;
the handler then publishes training.preempted, which the scheduler turns into
a new training.scheduled that resumes from that checkpoint.
"""

from __future__ import annotations

import asyncio
import logging

import torch
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lmforge.bus import Delivery, StageError
from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.service import Service
from lmforge.settings import ServiceSettings
from services.trainer.checkpoints import CheckpointIndex, CheckpointRef
from services.trainer.config import ConfigError, TrainConfig
from services.trainer.distributed import launch, write_job
from services.trainer.training import Progress, Trainer

log = logging.getLogger("lmforge.trainer")


class TrainerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", frozen=True)

    trainer_keep_checkpoints: int = Field(3, ge=1, description="Checkpoints kept per run.")
    trainer_threads: int = Field(0, ge=0, description="torch threads; 0 = torch's default.")
    trainer_peak_tflops: float = Field(
        0.0, ge=0, description="Device peak for MFU (989 for an H100's dense bf16); 0 = off.")


def train_config_from_plan(plan: ev.ResourcePlan, keep: int) -> TrainConfig:
    try:
        config = TrainConfig.from_plan(plan)
        config.checkpoint.keep = keep
        return config
    except ConfigError as exc:
        raise StageError(f"training plan rejected: {exc}") from None


class TrainerService(Service):
    name = "trainer"
    Settings = TrainerSettings

    def register(self) -> None:
        settings: TrainerSettings = self.settings  # type: ignore[assignment]
        if settings.trainer_threads:
            torch.set_num_threads(settings.trainer_threads)

        @self.bus.subscriber(subjects.TRAINING_SCHEDULED)
        async def on_scheduled(event: ev.TrainingScheduled, delivery: Delivery
                               ) -> ev.ModelTrained | ev.TrainingPreempted:
            config = train_config_from_plan(event.plan, settings.trainer_keep_checkpoints)
            (dataset_dir,) = self.input_dirs(event.run_id, event.dataset)
            loop = asyncio.get_running_loop()
            run_id = event.run_id

            def publish_from_thread(message, suffix: str) -> None:
                asyncio.run_coroutine_threadsafe(
                    delivery.publish(message, suffix=suffix), loop
                ).result(timeout=60)

            def on_progress(p: Progress) -> None:
                publish_from_thread(ev.TrainingProgress(
                    run_id=run_id, step=p.step, total_steps=p.total_steps, loss=p.loss,
                    learning_rate=p.learning_rate, tokens_per_second=p.tokens_per_second,
                    eta_seconds=p.eta_seconds, mfu=p.mfu), f"step-{p.step}")

            def on_checkpoint(ref: CheckpointRef) -> None:
                publish_from_thread(ev.TrainingCheckpointed(
                    run_id=run_id, step=ref.step, checkpoint=ev.ArtifactRef(digest=ref.digest)),
                    f"step-{ref.step}")

            checkpoint_root = settings.home.resolve() / "checkpoints"
            device = event.plan.device or "cpu"
            peak = settings.trainer_peak_tflops * 1e12

            def train():
                if config.world_size > 1:
                    job = write_job(settings.home.resolve() / "jobs" / run_id, config=config,
                                    dataset_dir=dataset_dir, store_root=self.store.root,
                                    checkpoint_root=checkpoint_root, run_id=run_id,
                                    device=device, peak_flops=peak)
                    return launch(job, config.world_size, stop=self.stopping,
                                  on_progress=on_progress, on_checkpoint=on_checkpoint,
                                  log_path=job.parent / "ranks.log")
                index = CheckpointIndex(checkpoint_root, run_id, self.store,
                                        keep=settings.trainer_keep_checkpoints)
                trainer = Trainer(config, dataset_dir, self.store, index,
                                  device=torch.device(device), peak_flops=peak)
                return trainer.run(stop=self.stopping, on_progress=on_progress,
                                   on_checkpoint=on_checkpoint)

            result = await asyncio.to_thread(train)
            if result.preempted:
                log.info("preempted at step %d; handing back", result.step,
                         extra={"run_id": run_id})
                return ev.TrainingPreempted(
                    run_id=run_id, step=result.step, reason="SIGTERM (spot notice or shutdown)",
                    checkpoint=ev.ArtifactRef(digest=result.checkpoint.digest),
                    scheduled=event,
                )
            stored = await asyncio.to_thread(self.store.put_dir, result.model_dir, move=True)
            return ev.ModelTrained(
                run_id=run_id, model_name=event.model_name,
                model=ev.ArtifactRef(digest=stored.digest, size_bytes=stored.size_bytes),
                dataset=event.dataset, heldout_perplexity=result.heldout_perplexity,
                train_tokens=result.train_tokens, steps=result.step,
                wall_seconds=result.wall_seconds, parameters=result.parameters,
                final_loss=result.final_loss, resumed_from_step=result.resumed_from_step,
                peak_memory_bytes=result.peak_memory_bytes, device=device,
                world_size=config.world_size,
            )
