"""scheduler settings (env prefix LMFORGE_SCHEDULER_; shared ones LMFORGE_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lmforge.settings import ServiceSettings
from services.scheduler.planning import PRESETS


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
