"""exporter settings (env prefix LMFORGE_EXPORTER_; shared ones LMFORGE_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lmforge.settings import ServiceSettings


class ExporterSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", frozen=True)

    exporter_onnx_tolerance: float = Field(1e-3, gt=0, description="Max |ORT - PyTorch| logit.")
