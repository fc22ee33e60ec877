"""quantizer settings (env prefix LMFORGE_QUANTIZER_; shared ones LMFORGE_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lmforge.settings import ServiceSettings


class QuantizerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", frozen=True)

    quantizer_bits: int = Field(8, description="4 or 8.")
    quantizer_group_size: int = Field(0, ge=0, description="0 = per output channel.")
    quantizer_max_ppl_increase: float = Field(
        0.05, ge=0, description="Quality gate: largest relative perplexity increase accepted."
    )
