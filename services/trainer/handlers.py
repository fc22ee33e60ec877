"""trainer's bus wiring.

training.scheduled -> run_training_job (in a worker thread) -> model.trained,
with training.progress at most once a second and training.checkpointed after
each checkpoint. The first progress carries the calibration (achieved FLOP/s per
device), which is also stored in the THROUGHPUT bucket under the plan's instance
type for the scheduler's next plan, with the measured checkpoint write rate.
SIGTERM (a spot notice) makes the loop checkpoint and stop; the handler then
publishes training.preempted, which the scheduler turns into a new
training.scheduled that resumes from that checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

import torch
from google.protobuf.message import Message

from lmforge.base_models import inspect_base_model
from lmforge.calibration import Calibration
from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket, ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import Delivery, subscriber
from lmforge.service import Bus, Service
from services.trainer.adaptation import ADAPTER_DIR
from services.trainer.checkpoints import CheckpointRef
from services.trainer.config import TrainConfig
from services.trainer.gpu_metrics import register_gpu_metrics
from services.trainer.jobs import TrainingJob, run_training_job
from services.trainer.kubernetes_launcher import build_cluster_launcher
from services.trainer.metrics import JobMetrics
from services.trainer.settings import TrainerSettings
from services.trainer.spot_notices import Notice, NoticeWatcher
from services.trainer.training import Progress, TrainResult

log = logging.getLogger("lmforge.trainer")

TRAINING_ACK_WAIT_S = 6.0
"""A training job's ack wait. The handler sends in-progress heartbeats every third
of it while it trains, so a live trainer keeps its job; a killed one's job goes to
the restarted (or another) trainer within seconds, not after the default 30 s."""


def progress_event(event: ev.TrainingScheduled, delivery: int, p: Progress
                   ) -> ev.TrainingProgress:
    return ev.TrainingProgress(
        run_id=event.run_id, step=p.step, total_steps=p.total_steps, loss=p.loss,
        learning_rate=p.learning_rate, tokens_per_second=p.tokens_per_second,
        eta_seconds=p.eta_seconds, mfu=p.mfu, attempt=event.attempt, delivery=delivery,
        measured_flops=p.measured_flops, calibration=p.calibration,
        instance_type=event.plan.instance_type if p.measured_flops else "")


def trained_event(event: ev.TrainingScheduled, result: TrainResult, digest: str, size: int,
                  device: str, world_size: int) -> ev.ModelTrained:
    return ev.ModelTrained(
        run_id=event.run_id, model_name=event.model_name,
        model=ev.ArtifactRef(digest=digest, size_bytes=size),
        dataset=event.dataset, heldout_perplexity=result.heldout_perplexity,
        train_tokens=result.train_tokens, steps=result.step,
        wall_seconds=result.wall_seconds, parameters=result.parameters,
        final_loss=result.final_loss, resumed_from_step=result.resumed_from_step,
        peak_memory_bytes=result.peak_memory_bytes, device=device, world_size=world_size,
        stopped_at_budget=result.stopped_at_budget, planned_steps=result.planned_steps,
        base_model=event.plan.base_model, adaptation=event.plan.adaptation,
        trainable_parameters=result.trainable_parameters,
        adapter_dir=ADAPTER_DIR if event.plan.adaptation == "lora" else "",
        task_eval=ev.TaskEval(examples=result.task_eval.examples,
                              exact_match=result.task_eval.exact_match,
                              macro_f1=result.task_eval.macro_f1,
                              labels=result.task_eval.labels) if result.task_eval else None,
        assistant_perplexity=result.assistant_perplexity)


def measured_calibration(plan: ev.ResourcePlan, p: Progress) -> Calibration:
    return Calibration(instance_type=plan.instance_type, precision=plan.precision,
                       flops_per_device=p.measured_flops, hidden_size=plan.hidden_size,
                       compiled=plan.compile, zero_stage=plan.zero_stage,
                       measured_at_unix=time.time(), how=p.calibration)


class TrainerService(Service[TrainerSettings]):
    name = ServiceName.TRAINER
    Settings = TrainerSettings

    def __init__(self, settings: TrainerSettings, bus: Bus) -> None:
        super().__init__(settings, bus)
        if settings.trainer_threads:
            torch.set_num_threads(settings.trainer_threads)
        register_gpu_metrics()
        if not settings.trainer_peak_tflops:
            log.info("MFU not reported: LMFORGE_TRAINER_PEAK_TFLOPS is unset")
        self.stop_reason = "SIGTERM (spot notice or shutdown)"
        self.cluster = build_cluster_launcher(settings, self.store)

    async def serve(self, stop: asyncio.Event) -> None:
        """Watch the spot notice endpoints while consuming: a notice stops the service the
        way SIGTERM does (the job in hand checkpoints and is handed back), with the notice
        as the reason in `training.preempted`."""
        loop = asyncio.get_running_loop()

        def on_notice(notice: Notice) -> None:
            self.stop_reason = notice.reason()
            self.stopping.set()
            stop.set()

        def from_watcher(notice: Notice) -> None:
            loop.call_soon_threadsafe(on_notice, notice)

        watcher = NoticeWatcher(self.settings.notice_sources(), self.settings.trainer_spot_poll_s,
                                from_watcher)
        watcher.start()
        try:
            await stop.wait()
        finally:
            watcher.stop()

    def stage_config(self) -> dict[str, object]:
        """Threads and checkpoints kept do not change the model; the plan in the event does."""
        return {"trainer_peak_tflops": self.settings.trainer_peak_tflops}

    async def stage_inputs(self, event: Message) -> bytes:
        """The plan and dataset, not the attempt: a resumed run's result is the same model."""
        assert isinstance(event, ev.TrainingScheduled)
        inputs = ev.TrainingScheduled(dataset=event.dataset, plan=event.plan)
        return inputs.SerializeToString(deterministic=True)

    @subscriber(subjects.TRAINING_SCHEDULED, cache_outputs=(ev.ModelTrained,),
                ack_wait_s=TRAINING_ACK_WAIT_S)
    async def on_scheduled(self, event: ev.TrainingScheduled, delivery: Delivery
                           ) -> ev.ModelTrained | ev.TrainingPreempted:
        if event.plan.base_model:
            # Checked here too: the trainer's roots and pickle setting are its own.
            await asyncio.to_thread(
                inspect_base_model, event.plan.base_model,
                self.settings.base_model_roots(delivery.tenant),
                allow_pickle=self.settings.base_model_allow_pickle)
        config = TrainConfig.from_plan(event.plan)
        config.checkpoint.keep = self.settings.trainer_keep_checkpoints
        (dataset_dir,) = self.input_dirs(event.run_id, event.dataset)
        device = event.plan.device or "cpu"
        job = TrainingJob(run_id=event.run_id, config=config, dataset_dir=dataset_dir,
                          dataset_digest=event.dataset.digest, store=self.store,
                          home=self.settings.home.resolve(), device=device,
                          peak_flops=self.settings.trainer_peak_tflops * 1e12)
        loop = asyncio.get_running_loop()
        throughput = self.bus.key_value(Bucket.THROUGHPUT)
        measured: list[Calibration] = []

        def publish_from_thread(message: Message, suffix: str) -> None:
            # No timeout: while NATS restarts the publish waits for it, and so does
            # training (the outputs of work done are never dropped).
            asyncio.run_coroutine_threadsafe(
                delivery.publish(message, suffix=suffix), loop).result()

        def remember(calibration: Calibration) -> None:
            if not calibration.instance_type:
                log.info("calibration not stored: the plan names no instance type")
                return
            measured[:] = [calibration]
            asyncio.run_coroutine_threadsafe(
                throughput.put(calibration.key, calibration.to_json()), loop).result()

        metrics = JobMetrics(event.run_id)

        def on_progress(p: Progress) -> None:
            metrics.progress(p)
            # A resumed job publishes its steps again under new ids (not deduplicated).
            publish_from_thread(progress_event(event, delivery.deliveries, p),
                                f"delivery-{delivery.deliveries}-step-{p.step}")
            if p.measured_flops:
                log.info("calibrated: %.1f GFLOP/s per device on %s (%s)",
                         p.measured_flops / 1e9, event.plan.instance_type or device,
                         p.calibration)
                remember(measured_calibration(event.plan, p))

        def on_checkpoint(ref: CheckpointRef) -> None:
            metrics.checkpoint(ref)
            publish_from_thread(ev.TrainingCheckpointed(
                run_id=event.run_id, step=ref.step,
                checkpoint=ev.ArtifactRef(digest=ref.digest, size_bytes=ref.size_bytes),
                checkpoint_seconds=ref.seconds, next_interval=ref.next_interval),
                f"step-{ref.step}")
            if measured and ref.seconds and ref.size_bytes:
                remember(replace(measured[0],
                                 checkpoint_gb_per_s=ref.size_bytes / ref.seconds / 1e9))

        with metrics:
            result = await asyncio.to_thread(run_training_job, job, stop=self.stopping,
                                             on_progress=on_progress,
                                             on_checkpoint=on_checkpoint,
                                             cluster=self.cluster)
            metrics.finished(result)
        if result.preempted:
            assert result.checkpoint is not None, "a preempted job has checkpointed"
            log.info("preempted at step %d; handing back", result.step)
            return ev.TrainingPreempted(
                run_id=event.run_id, step=result.step,
                reason=self.stop_reason,
                checkpoint=ev.ArtifactRef(digest=result.checkpoint.digest), scheduled=event)
        assert result.model_dir is not None, "a finished job has saved its model"
        stored = await asyncio.to_thread(self.store.put_dir, result.model_dir, move=True)
        return trained_event(event, result, stored.digest, stored.size_bytes, device,
                             config.world_size)
