"""trainer settings (env prefix LMFORGE_TRAINER_; shared ones LMFORGE_)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from lmforge.settings import ServiceSettings
from services.trainer.spot_notices import NoticeSource


class TrainerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", frozen=True)

    trainer_keep_checkpoints: int = Field(3, ge=1, description="Checkpoints kept per run.")
    trainer_threads: int = Field(0, ge=0, description="torch threads; 0 = torch's default.")
    trainer_peak_tflops: float = Field(
        0.0, ge=0, description="Device peak for MFU (989 for an H100's dense bf16); 0 = off.")
    trainer_spot_notices: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Spot termination-notice endpoints to poll, comma "
        "separated: aws, gcp, azure (their metadata endpoints) or provider=URL. Empty: none "
        "(SIGTERM still checkpoints and hands back).")
    trainer_spot_poll_s: float = Field(5.0, gt=0, le=60, description="Seconds between polls "
                                       "of the spot notice endpoints.")

    @field_validator("trainer_spot_notices", mode="before")
    @classmethod
    def _split_sources(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("trainer_spot_notices")
    @classmethod
    def _known_sources(cls, value: list[str]) -> list[str]:
        for spec in value:
            NoticeSource.parse(spec)  # raises ValueError naming the bad one
        return value

    def notice_sources(self) -> list[NoticeSource]:
        return [NoticeSource.parse(spec) for spec in self.trainer_spot_notices]
