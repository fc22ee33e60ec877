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

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lmforge.bus import Delivery, StageError
from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.service import Service
from lmforge.settings import ServiceSettings
from services.trainer.checkpoints import CheckpointIndex, CheckpointRef
from services.trainer.training import Progress, TrainConfig, Trainer

log = logging.getLogger("lmforge.trainer")


class TrainerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", frozen=True)

    trainer_keep_checkpoints: int = Field(3, ge=1, description="Checkpoints kept per run.")
    trainer_threads: int = Field(0, ge=0, description="torch threads; 0 = torch's default.")


def train_config_from_plan(plan: ev.ResourcePlan) -> TrainConfig:
    try:
        return TrainConfig(
            hidden_size=plan.hidden_size, num_layers=plan.num_layers, num_heads=plan.num_heads,
            intermediate_size=plan.intermediate_size, seq_len=plan.seq_len,
            micro_batch=plan.micro_batch, max_steps=plan.max_steps,
            learning_rate=plan.learning_rate, warmup_steps=plan.warmup_steps,
            checkpoint_interval=plan.checkpoint_interval, precision=plan.precision or "fp32",
            seed=plan.seed,
        )
    except ValueError as exc:
        raise StageError(f"training plan rejected: {exc}") from None


class TrainerService(Service):
    name = "trainer"
    Settings = TrainerSettings

    def register(self) -> None:
        settings: TrainerSettings = self.settings  # type: ignore[assignment]
        if settings.trainer_threads:
            import torch

            torch.set_num_threads(settings.trainer_threads)

        @self.bus.subscriber(subjects.TRAINING_SCHEDULED)
        async def on_scheduled(event: ev.TrainingScheduled, delivery: Delivery
                               ) -> ev.ModelTrained | ev.TrainingPreempted:
            config = train_config_from_plan(event.plan)
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
                    eta_seconds=p.eta_seconds), f"step-{p.step}")

            def on_checkpoint(ref: CheckpointRef) -> None:
                publish_from_thread(ev.TrainingCheckpointed(
                    run_id=run_id, step=ref.step, checkpoint=ev.ArtifactRef(digest=ref.digest)),
                    f"step-{ref.step}")

            def train():
                index = CheckpointIndex(settings.home.resolve() / "checkpoints", run_id,
                                        self.store, keep=settings.trainer_keep_checkpoints)
                trainer = Trainer(config, dataset_dir, self.store, index)
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
            )
