"""data-prep settings (env prefix LMFORGE_DATAPREP_; shared ones LMFORGE_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lmforge.settings import ServiceSettings


class DataPrepSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", frozen=True)

    dataprep_vocab_size: int = Field(4096, gt=256, description="Target BPE vocabulary size.")
    dataprep_seq_len: int = Field(128, ge=16, le=32768, description="Training context length.")
    dataprep_heldout_fraction: float = Field(0.05, gt=0, lt=0.5,
                                             description="Share of documents held out.")
    dataprep_max_record_bytes: int = Field(1_000_000, ge=1024,
                                           description="Longer records are skipped.")
