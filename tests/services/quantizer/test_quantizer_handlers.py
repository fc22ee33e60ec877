"""The quantizer on the bus: model.quantized carries fp / RTN / AWQ perplexities and what
is served; a failed gate is a stage.failed naming them, or, with the fallback, an fp32
model.quantized that says why."""

from __future__ import annotations

import asyncio
import shutil

from lmforge.artifacts import ArtifactStore
from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.quantization_request import write_overrides
from services.quantizer.handlers import QuantizerService


def _trained(tmp_path, trained_model, prepared_dataset, run_id: str,
             overrides: dict | None = None) -> ev.ModelTrained:
    store = ArtifactStore(tmp_path / "artifacts")
    dataset_dir = prepared_dataset.path
    if overrides:  # what data-prep stores for a run that asked (lmforge run --quantize...)
        dataset_dir = tmp_path / f"dataset-{run_id}"
        shutil.copytree(prepared_dataset.path, dataset_dir)
        write_overrides(dataset_dir, overrides)
    model, dataset = store.put_dir(trained_model.path), store.put_dir(dataset_dir)
    return ev.ModelTrained(
        run_id=run_id, model_name="m",
        model=ev.ArtifactRef(digest=model.digest, size_bytes=model.size_bytes),
        dataset=ev.ArtifactRef(digest=dataset.digest, size_bytes=dataset.size_bytes))


def test_a_failed_gate_is_a_stage_failure_naming_the_figures(harness, tmp_path, trained_model,
                                                             prepared_dataset):
    event = _trained(tmp_path, trained_model, prepared_dataset, "strict")

    async def scenario():
        async with harness.service(QuantizerService, home=tmp_path,
                                   quantizer_max_ppl_increase=0.0,
                                   quantizer_calibration_samples=8):
            await harness.publish(event, "strict")
            return await harness.wait_for(subjects.STAGE_FAILED, 1, run_id="strict")

    (failed,) = asyncio.run(scenario())
    assert failed.stage == "quantizer" and not failed.dead_lettered
    assert "quality gate failed" in failed.reason
    for figure in ("fp ", "RTN int4 ", "AWQ int4 "):
        assert figure in failed.reason


def test_the_fallback_serves_fp32_and_the_event_says_why(harness, tmp_path, trained_model,
                                                         prepared_dataset):
    event = _trained(tmp_path, trained_model, prepared_dataset, "lenient")

    async def scenario():
        async with harness.service(QuantizerService, home=tmp_path,
                                   quantizer_max_ppl_increase=0.0,
                                   quantizer_on_gate_failure="serve-fp",
                                   quantizer_calibration_samples=8):
            await harness.publish(event, "lenient")
            return await harness.wait_for(subjects.MODEL_QUANTIZED, 1, run_id="lenient")

    (quantized,) = asyncio.run(scenario())
    assert quantized.method == "awq-int4" and not quantized.passed_quality_gate
    assert quantized.served == "fp32" and "quality gate failed" in quantized.served_reason
    assert min(quantized.perplexity_fp, quantized.perplexity_rtn_int4,
               quantized.perplexity_awq_int4) > 0
    assert quantized.perplexity_after == quantized.perplexity_awq_int4
    assert quantized.weight_format == "awq-gemm" and quantized.quantized.digest
    # The same perplexities on /metrics, by method, for the dashboards.
    from prometheus_client import REGISTRY

    for method, value in (("fp", quantized.perplexity_fp),
                          ("rtn-int4", quantized.perplexity_rtn_int4),
                          ("awq-int4", quantized.perplexity_awq_int4)):
        assert REGISTRY.get_sample_value("lmforge_quantizer_perplexity", {
            "model": event.model_name, "method": method}) == value
    assert (REGISTRY.get_sample_value("lmforge_quantizer_gate_total", {"passed": "false"})
            or 0) >= 1


def test_a_runs_own_choices_win_over_the_service_settings(harness, tmp_path, trained_model,
                                                          prepared_dataset):
    # The service fails a missed gate; this run asked for round-to-nearest int8 and for
    # fp32 to be served should it miss a gate of 0.
    lenient = _trained(tmp_path, trained_model, prepared_dataset, "mine",
                       {"method": "rtn", "bits": 8, "on_gate_failure": "serve-fp",
                        "max_ppl_increase": 0.0})
    # int8 asked of a quantizer whose method is AWQ (int4 only), the method left to it:
    # the CLI and data-prep refuse that now, a dataset stored before still says why here.
    impossible = _trained(tmp_path, trained_model, prepared_dataset, "odd", {"bits": 8})

    async def scenario():
        async with harness.service(QuantizerService, home=tmp_path,
                                   quantizer_calibration_samples=8):
            await harness.publish(lenient, "mine")
            await harness.publish(impossible, "odd")
            return (await harness.wait_for(subjects.MODEL_QUANTIZED, 1, run_id="mine"),
                    await harness.wait_for(subjects.STAGE_FAILED, 1, run_id="odd"))

    (quantized,), (failed,) = asyncio.run(scenario())
    assert (quantized.method, quantized.bits, quantized.weight_format) == (
        "rtn-int8", 8, "lmforge-qcodes")
    if not quantized.passed_quality_gate:  # int8 may lose nothing: the gate of 0 then passes
        assert quantized.served == "fp32" and "quality gate failed" in quantized.served_reason
    assert "its quantization choices {'bits': 8} cannot be honoured" in failed.reason
    assert "AWQ is int4 only" in failed.reason
    assert not failed.dead_lettered


def test_the_run_config_lays_the_runs_choices_over_the_settings(tmp_path):
    from services.quantizer.judged import QuantizeConfig

    service = QuantizerService.__new__(QuantizerService)  # only run_config is exercised
    service.config = QuantizeConfig(group_size=128, max_ppl_increase=0.05,
                                    calibration_samples=64)
    (tmp_path / "asked").mkdir()
    write_overrides(tmp_path / "asked", {"method": "rtn", "on_gate_failure": "serve-fp",
                                         "max_ppl_increase": 0.0, "group_size": 64,
                                         "calibration_samples": 16})
    (tmp_path / "plain").mkdir()
    assert service.run_config("r", tmp_path / "plain") is service.config
    assert service.run_config("r", tmp_path / "asked") == QuantizeConfig(
        method="rtn", bits=4, group_size=64, max_ppl_increase=0.0, on_gate_failure="serve-fp",
        calibration_samples=16)
