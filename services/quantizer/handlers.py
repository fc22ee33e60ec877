"""quantizer's bus wiring: model.trained -> quantize and judge -> model.quantized.

The work (AWQ or round-to-nearest, the perplexity comparison, the gate) is
judged.py's; a failed gate without a fallback raises `QualityGateFailed`, which
the bus turns into stage.failed with its figures.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import replace
from pathlib import Path

from lmforge.contracts import subjects
from lmforge.contracts.names import ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import Delivery, subscriber
from lmforge.failures import BadInput
from lmforge.quantization_request import read_overrides
from lmforge.service import Bus, Service
from lmforge.task_eval import TaskEvalResult
from services.quantizer.judged import QuantizeConfig, quantize_and_judge
from services.quantizer.metrics import record_quantized
from services.quantizer.settings import QuantizerSettings

log = logging.getLogger("lmforge.quantizer")


def quantize_config(settings: QuantizerSettings) -> QuantizeConfig:
    """The service's QuantizeConfig; a bad combination stops it with one line."""
    try:
        return QuantizeConfig(
            method=settings.quantizer_method, bits=settings.quantizer_bits,
            group_size=settings.quantizer_group_size,
            max_ppl_increase=settings.quantizer_max_ppl_increase,
            on_gate_failure=settings.quantizer_on_gate_failure,
            calibration_samples=settings.quantizer_calibration_samples,
            calibration_length=settings.quantizer_calibration_length,
            compare=settings.quantizer_compare,
            max_exact_match_drop=settings.quantizer_max_exact_match_drop)
    except ValueError as exc:
        raise SystemExit(f"invalid settings: LMFORGE_QUANTIZER_*: {exc}") from None


class QuantizerService(Service[QuantizerSettings]):
    name = ServiceName.QUANTIZER
    Settings = QuantizerSettings

    def __init__(self, settings: QuantizerSettings, bus: Bus) -> None:
        super().__init__(settings, bus)
        self.config = quantize_config(settings)

    def run_config(self, run_id: str, dataset_dir: Path) -> QuantizeConfig:
        """The service's config with the run's own choices (`lmforge run --quantize...`,
        stored with its dataset) laid over it; a combination that cannot be honoured is
        the run's bad input, named."""
        overrides = read_overrides(dataset_dir)
        if not overrides:
            return self.config
        if overrides.get("method") == "rtn" and "bits" not in overrides:
            overrides["bits"] = self.config.bits if self.config.method == "rtn" else 4
        try:
            config = replace(self.config, **overrides)
        except (TypeError, ValueError) as exc:
            raise BadInput(f"run {run_id}: its quantization choices {overrides} cannot be "
                           f"honoured with this quantizer's settings: {exc}") from None
        log.info("run %s: quantization as the run asked: %s", run_id, overrides)
        return config

    @subscriber(subjects.MODEL_TRAINED, cache_outputs=(ev.ModelQuantized,))
    async def on_trained(self, event: ev.ModelTrained, delivery: Delivery) -> ev.ModelQuantized:
        model_dir, dataset_dir = self.input_dirs(event.run_id, event.model, event.dataset)
        config = self.run_config(event.run_id, dataset_dir)
        work = self.store.scratch_dir("quantized-")
        try:
            outcome = await asyncio.to_thread(quantize_and_judge, model_dir, dataset_dir, work,
                                              config)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        stored = await asyncio.to_thread(self.store.put_dir, work, move=True)
        record_quantized(event.model_name, perplexities={
            "fp": outcome.perplexity_fp, "rtn-int4": outcome.perplexity_rtn_int4,
            "awq-int4": outcome.perplexity_awq_int4, outcome.method: outcome.perplexity_method},
            seconds=outcome.seconds, passed=outcome.passed_quality_gate)
        return ev.ModelQuantized(
            run_id=event.run_id, model_name=event.model_name, model=event.model,
            quantized=ev.ArtifactRef(digest=stored.digest, size_bytes=stored.size_bytes),
            dataset=event.dataset, method=outcome.method, bits=config.bits,
            group_size=config.group_size, perplexity_before=outcome.perplexity_fp,
            perplexity_after=outcome.perplexity_method,
            passed_quality_gate=outcome.passed_quality_gate,
            perplexity_fp=outcome.perplexity_fp,
            perplexity_rtn_int4=outcome.perplexity_rtn_int4,
            perplexity_awq_int4=outcome.perplexity_awq_int4,
            served=outcome.served, served_reason=outcome.served_reason,
            weight_format=outcome.weight_format, quantize_seconds=outcome.seconds,
            task_eval_fp=task_eval_message(outcome.task_eval_fp),
            task_eval_quantized=task_eval_message(outcome.task_eval_quantized))


def task_eval_message(result: TaskEvalResult | None) -> ev.TaskEval | None:
    if result is None:
        return None
    return ev.TaskEval(examples=result.examples, exact_match=result.exact_match,
                       macro_f1=result.macro_f1, labels=result.labels)
