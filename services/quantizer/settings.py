"""quantizer settings (env prefix LMFORGE_QUANTIZER_; shared ones LMFORGE_)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lmforge.settings import ServiceSettings


class QuantizerSettings(ServiceSettings):
    """Service-wide defaults. A run's own choices (`lmforge run --quantize`,
    `--quantize-bits`, `--quantize-group-size`, `--on-quality-gate-failure`,
    `--max-ppl-increase`, `--calibration-samples`; dataset.ready's `quantization`) are
    laid over them for that run."""

    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", frozen=True)

    quantizer_method: Literal["awq", "rtn"] = Field(
        "awq", description="awq (int4, calibrated on the run's training split) or rtn "
                           "(round-to-nearest, the baseline; int4 or int8).")
    quantizer_bits: Literal[4, 8] = Field(4, description="4 (packed AutoAWQ GEMM) or 8 "
                                                         "(rtn only).")
    quantizer_group_size: int = Field(
        128, gt=0, description="int4 input columns per scale; a layer whose width it does "
                               "not divide gets the largest kernel group size that does.")
    quantizer_max_ppl_increase: float = Field(
        0.05, ge=0, description="Quality gate: largest relative perplexity increase accepted."
    )
    quantizer_max_exact_match_drop: float | None = Field(
        None, ge=0, le=1, description="Quality gate on the run's eval set (lmforge run "
        "--eval-set): largest absolute exact-match drop of the quantized model from fp "
        "accepted (0.05 = five points); unset: the figures are reported, not gated.")
    quantizer_on_gate_failure: Literal["fail", "serve-fp"] = Field(
        "fail", description="fail: stage.failed naming the figures; serve-fp: serve fp32 and "
                            "say so in every event. A run's own choice (lmforge run "
                            "--on-quality-gate-failure) wins.")
    quantizer_calibration_samples: int = Field(
        64, ge=1, description="AWQ calibration windows from the training split (fewer when "
                              "the split is smaller).")
    quantizer_calibration_length: int = Field(
        0, ge=0, description="Tokens per calibration window; 0 = the dataset's seq_len.")
    quantizer_compare: bool = Field(
        True, description="Also measure the other int4 method (RTN beside AWQ), for the "
                          "comparison in model.quantized.")
