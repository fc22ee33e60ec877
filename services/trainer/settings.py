"""trainer settings (env prefix LMFORGE_TRAINER_; shared ones LMFORGE_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lmforge.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", frozen=True)

    trainer_keep_checkpoints: int = Field(3, ge=1, description="Checkpoints kept per run.")
    trainer_threads: int = Field(0, ge=0, description="torch threads; 0 = torch's default.")
    trainer_peak_tflops: float = Field(
        0.0, ge=0, description="Device peak for MFU (989 for an H100's dense bf16); 0 = off.")
