"""data-prep settings (env prefix LMFORGE_DATAPREP_; shared ones LMFORGE_)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from lmforge.settings import ServiceSettings
from services.data_prep.language import LanguageConfig
from services.data_prep.near_dup import NearDupConfig
from services.data_prep.pii import PiiConfig
from services.data_prep.prepare import PrepConfig
from services.data_prep.quality import QualityConfig
from services.data_prep.semantic import SemanticConfig
from services.data_prep.sources import ReadConfig


class DataPrepSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", frozen=True)

    dataprep_vocab_size: int = Field(4096, gt=256, description="Target BPE vocabulary size.")
    dataprep_seq_len: int = Field(128, ge=16, le=32768, description="Training context length.")
    dataprep_heldout_fraction: float = Field(0.05, gt=0, lt=0.5,
                                             description="Share of documents held out.")
    dataprep_max_record_bytes: int = Field(1_000_000, ge=1024,
                                           description="Longer records are skipped.")
    dataprep_s3_endpoint_url: str = Field(
        "", description="S3-protocol endpoint (MinIO, a test server); empty: AWS_ENDPOINT_URL.")
    dataprep_quality: bool = Field(True, description="Gopher/C4-style quality filters.")
    dataprep_quality_min_words: int = Field(3, ge=0, description="Shorter documents are dropped "
                                            "(CJK characters count as words).")
    dataprep_languages: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Allowed languages (ISO 639-1, comma separated); "
        "empty: every language, no detection.")
    dataprep_pii: bool = Field(True, description="Replace personal data and secrets by typed "
                               "placeholders before anything is tokenized.")
    dataprep_near_dup: bool = Field(True, description="MinHash/LSH near-duplicate removal.")
    dataprep_near_dup_threshold: float = Field(0.7, gt=0, lt=1,
                                               description="Jaccard similarity of duplicates.")
    dataprep_near_dup_keep: str = Field("longest", pattern="^(longest|first)$",
                                        description="Which document of a cluster is kept.")
    dataprep_semantic: bool = Field(
        True, description="Embed the corpus (offline MiniLM) into a FAISS index: decontaminate "
        "the training split against the held-out one, weight the long tail, serve "
        "`lmforge search`.")
    dataprep_decontamination_threshold: float = Field(
        0.9, gt=0, le=1, description="Cosine similarity at which a training chunk copies a "
        "held-out one (the training document is dropped).")
    dataprep_semantic_dedup: bool = Field(False, description="SemDeDup-style dedup within "
                                          "embedding clusters.")
    dataprep_long_tail_cap: float = Field(3.0, ge=1, description="The most the rarest "
                                          "clusters' sampled share may exceed their natural "
                                          "share (1 = no re-weighting).")
    dataprep_near_dup_earlier_runs: bool = Field(
        False, description="Also drop near-copies of what earlier runs of the same model name "
        "were prepared from (their signature index, an artifact of their dataset).")

    @field_validator("dataprep_languages", mode="before")
    @classmethod
    def _split_languages(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip().lower() for v in value.split(",") if v.strip()]
        return value

    def prep_config(self) -> PrepConfig:
        """The pipeline's config from these settings (the service and `lmforge prep` share it)."""
        return PrepConfig(
            vocab_size=self.dataprep_vocab_size, seq_len=self.dataprep_seq_len,
            heldout_fraction=self.dataprep_heldout_fraction,
            read=ReadConfig(max_record_bytes=self.dataprep_max_record_bytes,
                            s3_endpoint_url=self.dataprep_s3_endpoint_url),
            quality=QualityConfig(enabled=self.dataprep_quality,
                                  min_words=self.dataprep_quality_min_words),
            language=LanguageConfig(allowed_languages=tuple(self.dataprep_languages)),
            pii=PiiConfig(enabled=self.dataprep_pii),
            near_dup=NearDupConfig(enabled=self.dataprep_near_dup,
                                   threshold=self.dataprep_near_dup_threshold,
                                   keep="first" if self.dataprep_near_dup_keep == "first"
                                   else "longest"),
            semantic=SemanticConfig(
                contamination_threshold=self.dataprep_decontamination_threshold,
                semantic_dedup=self.dataprep_semantic_dedup,
                reweight=self.dataprep_long_tail_cap > 1,
                long_tail_cap=self.dataprep_long_tail_cap) if self.dataprep_semantic else None,
        )
