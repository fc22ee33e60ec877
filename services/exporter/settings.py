"""exporter settings (env prefix LMFORGE_EXPORTER_; shared ones LMFORGE_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lmforge.settings import ServiceSettings


class ExporterSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", frozen=True)

    exporter_onnx_tolerance: float = Field(1e-3, gt=0, description="Max |ORT - PyTorch| logit.")
    exporter_onnx_int8: bool = Field(
        True, description="Also write onnx/model.int8.onnx (onnxruntime dynamic int8) and "
        "measure its held-out perplexity.")
    exporter_onnx_perplexity_windows: int = Field(
        64, ge=1, description="Held-out windows over which the ONNX graphs' perplexity is "
        "measured.")
    exporter_triton_model_name: str = Field(
        "lmforge", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        description="The model's name in model_repository/ (what Triton serves it as).")
    exporter_triton_max_batch_size: int = Field(
        8, ge=1, description="max_batch_size of the Triton config (dynamic batching).")
    exporter_triton_instance_kind: str = Field(
        "KIND_AUTO", pattern="^KIND_(AUTO|CPU|GPU)$",
        description="instance_group kind: KIND_AUTO (GPU where there is one), KIND_CPU or "
        "KIND_GPU.")
    exporter_triton_instance_count: int = Field(1, ge=1,
                                                description="Model instances per device.")
