"""The exporter on the bus: model.exported carries the KV-cache graph's parity, the fp32
and int8 graphs' perplexities and the Triton model, and the stored export holds them
with the eval set's figures."""

from __future__ import annotations

import asyncio
import json

import pytest

from lmforge.artifacts import ArtifactStore
from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from services.exporter.handlers import ExporterService


def test_model_exported_carries_the_onnx_figures_and_the_triton_model(
        harness, tmp_path, trained_model, prepared_dataset):
    store = ArtifactStore(tmp_path / "artifacts")
    model, dataset = store.put_dir(trained_model.path), store.put_dir(prepared_dataset.path)
    ref = ev.ArtifactRef(digest=model.digest, size_bytes=model.size_bytes)
    event = ev.ModelQuantized(
        run_id="r1", model_name="m", model=ref, quantized=ref, method="awq-int4",
        dataset=ev.ArtifactRef(digest=dataset.digest, size_bytes=dataset.size_bytes),
        served="fp32", served_reason="asked for fp32 in this test",
        task_eval_fp=ev.TaskEval(examples=12, exact_match=0.75, macro_f1=0.7, labels=3),
        task_eval_quantized=ev.TaskEval(examples=12, exact_match=0.5, macro_f1=0.45, labels=3))

    async def scenario():
        async with harness.service(ExporterService, home=tmp_path,
                                   exporter_triton_model_name="fortune-onnx",
                                   exporter_onnx_perplexity_windows=8):
            await harness.publish(event, "r1")
            return await harness.wait_for(subjects.MODEL_EXPORTED, 1, run_id="r1")

    (exported,) = asyncio.run(scenario())
    assert exported.onnx_parity_steps == 32 and 0 <= exported.onnx_max_abs_diff < 1e-4
    assert exported.onnx_heldout_perplexity > 1
    assert exported.onnx_int8_heldout_perplexity == pytest.approx(
        exported.onnx_heldout_perplexity, rel=0.1)
    assert exported.triton_model == "fortune-onnx"
    assert exported.precision == "fp32"
    export = store.get_dir(exported.export.digest)
    assert (export / "model_repository" / "fortune-onnx" / "config.pbtxt").is_file()
    assert (export / "model_repository" / "fortune-onnx" / "1" / "model.onnx").is_file()
    assert (export / "onnx" / "model.int8.onnx").is_file()
    assert (export / "hf" / "tokenizer.json").is_file()
    # the eval figures travel with the weights, the fp ones marked served (fp32 is served)
    task_eval = json.loads((export / "export.json").read_text())["task_eval"]
    assert task_eval == {"fp": {"examples": 12, "exact_match": 0.75, "macro_f1": 0.7,
                                "labels": 3},
                         "awq-int4": {"examples": 12, "exact_match": 0.5, "macro_f1": 0.45,
                                      "labels": 3},
                         "served": "fp"}


# Starts child processes (engine processes, the CLI, model exports): not in `make unit`.
pytestmark = pytest.mark.processes
