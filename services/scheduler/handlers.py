"""scheduler's bus wiring.

dataset.prepared -> plan_training -> training.scheduled
training.preempted -> the same job again (attempt + 1), resuming from its checkpoint
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lmforge.bus import Delivery, StageError
from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.service import Service
from lmforge.settings import ServiceSettings
from services.scheduler.planning import (
    PRESETS,
    Parallelism,
    Plan,
    PlanError,
    PlanRequest,
    PoolSpec,
    plan_training,
)


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the local CPUs compute bf16 natively rather than emulating it."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def machine_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)


class SchedulerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", frozen=True)

    scheduler_preset: str = Field("tiny", description=f"Model size preset: {sorted(PRESETS)}.")
    scheduler_time_budget_s: float = Field(
        120.0, gt=0, description="Training wall-clock budget when the run does not give one."
    )
    scheduler_micro_batch: int = Field(16, ge=1, description="Sequences per step.")
    scheduler_pool_gflops: float = Field(
        50.0, gt=0, description="Sustained training GFLOP/s of one local worker (fp32)."
    )
    scheduler_device: str = Field("cpu", pattern="^(cpu|cuda)$")
    scheduler_device_memory_gib: float = Field(
        0.0, ge=0, description="Memory of one device; 0 = this machine's RAM (cpu) or 80.")
    scheduler_engine: str = Field("plain", pattern="^(plain|deepspeed)$")
    scheduler_zero_stage: int = Field(0, ge=0, le=3)
    scheduler_world_size: int = Field(1, ge=1, description="Ranks per training job.")
    scheduler_gradient_checkpointing: bool = False
    scheduler_offload_optimizer: bool = False
    scheduler_offload_params: bool = False
    scheduler_precision: str = Field(
        "auto", pattern="^(auto|fp32|bf16)$",
        description="auto: bf16 where the CPU has native bf16 (AVX512-BF16/AMX) or on CUDA, "
        "else fp32 (emulated bf16 ran 8-10x slower than fp32 on an AVX2 EPYC).",
    )


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


class SchedulerService(Service):
    name = "scheduler"
    Settings = SchedulerSettings

    def register(self) -> None:
        s: SchedulerSettings = self.settings  # type: ignore[assignment]
        precision = s.scheduler_precision
        if precision == "auto":
            precision = "bf16" if s.scheduler_device == "cuda" or cpu_has_native_bf16() else "fp32"
        memory = s.scheduler_device_memory_gib or (
            machine_memory_gib() if s.scheduler_device == "cpu" else 80.0)
        pool = PoolSpec(device=s.scheduler_device, sustained_gflops=s.scheduler_pool_gflops,
                        precision=precision, memory_gib=memory)

        @self.bus.subscriber(subjects.DATASET_PREPARED)
        async def on_prepared(event: ev.DatasetPrepared, delivery: Delivery
                              ) -> ev.TrainingScheduled:
            request = PlanRequest(
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
            try:
                plan = plan_training(request, pool)
            except PlanError as exc:
                raise StageError(str(exc)) from None
            return ev.TrainingScheduled(run_id=event.run_id, model_name=event.model_name,
                                        dataset=event.dataset, plan=plan_to_proto(plan))

        @self.bus.subscriber(subjects.TRAINING_PREEMPTED)
        async def on_preempted(event: ev.TrainingPreempted, delivery: Delivery
                               ) -> ev.TrainingScheduled:
            again = ev.TrainingScheduled()
            again.CopyFrom(event.scheduled)
            again.attempt = event.scheduled.attempt + 1
            return again
