"""scheduler's bus wiring.

dataset.prepared -> plan_training (over the pool's catalog types, with the measured
throughput in the THROUGHPUT bucket) -> training.scheduled
training.preempted -> the same job again (attempt + 1), resuming from its checkpoint
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from lmforge.base_models import inspect_base_model
from lmforge.calibration import Calibration
from lmforge.catalog import Catalog, InstanceType, load_catalog
from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket, ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import Delivery, subscriber
from lmforge.service import Bus, Service
from services.scheduler.adaptation import Adaptation, AdaptationRequest
from services.scheduler.memory_model import GIB
from services.scheduler.planner import (
    DEFAULT_EPOCHS,
    Plan,
    PlanError,
    PlanReport,
    PlanRequest,
    plan_training,
)
from services.scheduler.settings import SchedulerSettings

log = logging.getLogger("lmforge.scheduler")


def plan_to_proto(plan: Plan) -> ev.ResourcePlan:
    p, o = plan.preset, plan.option
    return ev.ResourcePlan(
        preset=p.name, hidden_size=p.hidden_size, num_layers=p.num_layers,
        num_heads=p.num_heads, intermediate_size=p.intermediate_size,
        seq_len=plan.seq_len, micro_batch=o.micro_batch, grad_accum=o.grad_accum,
        max_steps=o.max_steps, learning_rate=plan.learning_rate,
        warmup_steps=plan.warmup_steps, checkpoint_interval=o.checkpoint_interval,
        precision=o.precision, device=o.instance.device, pool=o.instance.name,
        parameters=plan.parameters, estimated_seconds=o.seconds,
        seed=plan.seed, vocab_size=plan.vocab_size, family=plan.family,
        **dataclasses.asdict(plan.parallelism), compile=o.compiled,
        estimated_memory_gib=plan.memory.total_bytes / GIB,
        instance_type=o.instance.name, market=o.market, price_usd_per_hour=o.price_per_hour,
        estimated_usd=o.usd, preemptions_per_hour=o.instance.preemptions_per_hour(o.market),
        checkpoint_cost_s=o.checkpoint_cost_s, checkpoint_interval_s=o.checkpoint_interval_s,
        time_budget_s=plan.time_budget_s, planned_flops_per_device=o.step.flops_per_device,
        throughput_source=o.step.source, memory_headroom_gib=o.headroom_gib,
        device_memory_gib=o.instance.memory_gib, **adaptation_fields(plan.adaptation),
    )


def adaptation_fields(adaptation: Adaptation | None) -> dict[str, Any]:
    """The plan's base model and adaptation as ResourcePlan fields (none from scratch)."""
    if adaptation is None:
        return {}
    return {"base_model": str(adaptation.base.directory), "adaptation": adaptation.kind,
            "lora_rank": adaptation.rank, "lora_alpha": adaptation.alpha,
            "lora_dropout": adaptation.dropout, "lora_targets": list(adaptation.targets),
            "base_weights": adaptation.base_weights,
            "trainable_parameters": adaptation.trainable_parameters,
            "adaptation_reason": adaptation.reason}


def adaptation_request(t: ev.TrainingRequest, settings: SchedulerSettings, tenant: str = ""
                       ) -> AdaptationRequest | None:
    """The run's base model, checked from its files (the scheduler's roots for `tenant`'s
    runs), and what the user asked of the adaptation; None when the run trains from scratch."""
    if not t.base_model:
        return None
    base = inspect_base_model(t.base_model, settings.base_model_roots(tenant),
                              allow_pickle=settings.base_model_allow_pickle)
    return AdaptationRequest(
        base=base, kind=t.adaptation, lora_rank=t.lora_rank, lora_alpha=t.lora_alpha,
        lora_dropout=t.lora_dropout if t.HasField("lora_dropout") else None,
        lora_targets=tuple(t.lora_targets), base_weights=t.base_weights)


def plan_request(event: ev.DatasetPrepared, settings: SchedulerSettings,
                 pool: list[InstanceType], tenant: str = "") -> PlanRequest:
    """The run's own asks (`TrainingRequest`) over the scheduler's defaults; asking for a
    type this pool does not offer is refused, not quietly replaced."""
    t = event.training
    offered = [i.name for i in pool]
    wanted = tuple(t.instance_types) or tuple(offered)
    missing = [name for name in wanted if name not in offered]
    if missing:
        raise PlanError(f"instance type(s) {missing} asked for, but this scheduler's pool "
                        f"offers {offered} (LMFORGE_SCHEDULER_INSTANCE_TYPES)")
    adaptation = adaptation_request(t, settings, tenant)
    return PlanRequest(
        train_tokens=event.stats.train_tokens, vocab_size=event.vocab_size,
        seq_len=event.seq_len,
        time_budget_s=event.time_budget_s or settings.scheduler_time_budget_s,
        budget_usd=t.budget_usd, preset=t.model_size or settings.scheduler_preset,
        family=t.family or (adaptation.base.family if adaptation else "llama"),
        instance_types=wanted, adaptation=adaptation,
        gradient_checkpointing=t.gradient_checkpointing, precision=t.precision,
        compile=t.compile, micro_batch=t.micro_batch, grad_accum=t.grad_accum,
        global_batch=t.global_batch or settings.scheduler_global_batch,
        epochs=t.epochs or DEFAULT_EPOCHS, market=t.market)


def describe_choice(report: PlanReport) -> str:
    o = report.plan.option
    line = (f"{o.label}: {o.describe()}; {o.max_steps} steps, {o.seconds:.0f} s, "
            f"${o.usd:.2f}, {o.headroom_gib:.1f} GiB headroom, {o.step.source} throughput "
            f"{o.step.flops_per_device / 1e9:.1f} GFLOP/s per device, checkpoint every "
            f"{o.checkpoint_interval} steps")
    return f"{line}; {report.note}" if report.note else line


class SchedulerService(Service[SchedulerSettings]):
    name = ServiceName.SCHEDULER
    Settings = SchedulerSettings

    def __init__(self, settings: SchedulerSettings, bus: Bus) -> None:
        super().__init__(settings, bus)
        self.catalog: Catalog = load_catalog(settings.catalog)
        self.pool = self.catalog.select(settings.scheduler_instance_types)

    def stage_config(self) -> dict[str, object]:
        """The settings and the catalog entries they resolve to on this machine (memory,
        precision, prices): a changed catalog makes a new plan."""
        return {**super().stage_config(),
                "pool": [dataclasses.asdict(instance) for instance in self.pool]}

    async def calibrations(self) -> dict[str, Calibration]:
        bucket = self.bus.key_value(Bucket.THROUGHPUT)
        found: dict[str, Calibration] = {}
        for key in await bucket.keys():
            data = await bucket.get(key)
            if data:
                found[key] = Calibration.from_json(data)
        return found

    @subscriber(subjects.DATASET_PREPARED, cache_outputs=(ev.TrainingScheduled,))
    async def on_prepared(self, event: ev.DatasetPrepared, delivery: Delivery
                          ) -> ev.TrainingScheduled:
        request = plan_request(event, self.settings, self.pool, delivery.tenant)
        types = [i for i in self.pool if i.name in request.instance_types]
        report = plan_training(request, types, await self.calibrations())
        log.info("run %s planned on %s", event.run_id, describe_choice(report))
        return ev.TrainingScheduled(run_id=event.run_id, model_name=event.model_name,
                                    dataset=event.dataset, plan=plan_to_proto(report.plan))

    @subscriber(subjects.TRAINING_PREEMPTED)
    async def on_preempted(self, event: ev.TrainingPreempted, delivery: Delivery
                           ) -> ev.TrainingScheduled:
        again = ev.TrainingScheduled()
        again.CopyFrom(event.scheduled)
        again.attempt = event.scheduled.attempt + 1
        return again
