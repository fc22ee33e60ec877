"""scheduler settings (env prefix LMFORGE_SCHEDULER_; shared ones LMFORGE_, including
LMFORGE_CATALOG, the user's instance types merged over the shipped catalog)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from lmforge.catalog import LOCAL_CPU
from lmforge.presets import PRESETS
from lmforge.settings import ServiceSettings


class SchedulerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", frozen=True)

    scheduler_preset: str = Field(
        "tiny", description=f"Model size when the run does not ask for one: {sorted(PRESETS)}.")
    scheduler_time_budget_s: float = Field(
        120.0, gt=0, description="Training wall-clock budget when the run does not give one.")
    scheduler_global_batch: int = Field(
        0, ge=0, description="Sequences per optimizer step when the run does not say; "
        "0 = the preset's (16).")
    scheduler_instance_types: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [LOCAL_CPU],
        description="The catalog types this worker pool offers (comma separated); the planner "
        "chooses among them. local-cpu = this machine.")

    @field_validator("scheduler_instance_types", mode="before")
    @classmethod
    def _split_types(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("scheduler_preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; known: {sorted(PRESETS)}")
        return value
