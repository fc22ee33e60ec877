"""scheduler's bus wiring.

dataset.prepared -> plan_training -> training.scheduled
training.preempted -> the same job again (attempt + 1), resuming from its checkpoint
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from lmforge.contracts import subjects
from lmforge.contracts.names import ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import Delivery, subscriber
from lmforge.service import Bus, Service
from services.scheduler.planning import Parallelism, Plan, PlanRequest, PoolSpec, plan_training
from services.scheduler.settings import SchedulerSettings


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the local CPUs compute bf16 natively rather than emulating it."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def machine_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)


def plan_to_proto(plan: Plan) -> ev.ResourcePlan:
    p = plan.preset
    return ev.ResourcePlan(
        preset=p.name, hidden_size=p.hidden_size, num_layers=p.num_layers,
        num_heads=p.num_heads, intermediate_size=p.intermediate_size,
        seq_len=plan.seq_len, micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
        max_steps=plan.max_steps, learning_rate=plan.learning_rate,
        warmup_steps=plan.warmup_steps, checkpoint_interval=plan.checkpoint_interval,
        precision=plan.precision, device=plan.device, pool=plan.pool,
        parameters=plan.parameters, estimated_seconds=plan.estimated_seconds,
        seed=plan.seed, vocab_size=plan.vocab_size, family="llama",
        **dataclasses.asdict(plan.parallelism),
        estimated_memory_gib=plan.memory.total_bytes / (1 << 30),
    )


class SchedulerService(Service[SchedulerSettings]):
    name = ServiceName.SCHEDULER
    Settings = SchedulerSettings

    def __init__(self, settings: SchedulerSettings, bus: Bus) -> None:
        super().__init__(settings, bus)
        precision = settings.scheduler_precision
        if precision == "auto":
            precision = ("bf16" if settings.scheduler_device == "cuda" or cpu_has_native_bf16()
                         else "fp32")
        memory = settings.scheduler_device_memory_gib or (
            machine_memory_gib() if settings.scheduler_device == "cpu" else 80.0)
        self.pool = PoolSpec(device=settings.scheduler_device,
                             sustained_gflops=settings.scheduler_pool_gflops,
                             precision=precision, memory_gib=memory)

    def stage_config(self) -> dict[str, object]:
        """The settings and the pool they resolve to on this machine (precision, memory)."""
        return {**super().stage_config(), "pool": dataclasses.asdict(self.pool)}

    def plan_request(self, event: ev.DatasetPrepared) -> PlanRequest:
        s = self.settings
        return PlanRequest(
            train_tokens=event.stats.train_tokens,
            vocab_size=event.vocab_size,
            seq_len=event.seq_len,
            time_budget_s=event.time_budget_s or s.scheduler_time_budget_s,
            preset=s.scheduler_preset,
            micro_batch=s.scheduler_micro_batch,
            parallelism=Parallelism(
                engine=s.scheduler_engine, zero_stage=s.scheduler_zero_stage,
                world_size=s.scheduler_world_size,
                gradient_checkpointing=s.scheduler_gradient_checkpointing,
                offload_optimizer=s.scheduler_offload_optimizer,
                offload_params=s.scheduler_offload_params),
        )

    @subscriber(subjects.DATASET_PREPARED, cache_outputs=(ev.TrainingScheduled,))
    async def on_prepared(self, event: ev.DatasetPrepared, delivery: Delivery
                          ) -> ev.TrainingScheduled:
        plan = plan_training(self.plan_request(event), self.pool)
        return ev.TrainingScheduled(run_id=event.run_id, model_name=event.model_name,
                                    dataset=event.dataset, plan=plan_to_proto(plan))

    @subscriber(subjects.TRAINING_PREEMPTED)
    async def on_preempted(self, event: ev.TrainingPreempted, delivery: Delivery
                           ) -> ev.TrainingScheduled:
        again = ev.TrainingScheduled()
        again.CopyFrom(event.scheduled)
        again.attempt = event.scheduled.attempt + 1
        return again
