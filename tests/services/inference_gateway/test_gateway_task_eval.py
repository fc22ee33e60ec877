"""The eval set's figures reach /v1/models from the export the gateway loads: the
exporter writes them into export.json beside the weights, so a deploy and a
replica's restore from the deployments bucket both find them."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest

from lmforge.artifacts import ArtifactStore
from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.task_eval import quantized_run_figures
from services.inference_gateway.handlers import GatewayService
from tests.services.inference_gateway.gateway_replicas import MODEL, exported, store_export

IN_PROCESS = dict(gateway_port=0, gateway_http_port=0, gateway_batching=False,
                  gateway_threads=1)


def _models(port: int) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as answer:
        return json.loads(answer.read())["data"]


def test_v1_models_shows_the_eval_figures_of_the_served_weights(harness, tmp_path,
                                                                trained_model):
    quantized = ev.ModelQuantized(
        run_id="run-e", method="awq-int4", passed_quality_gate=False, served="fp32",
        served_reason="quality gate failed: exact match drop 0.200 > 0.050",
        task_eval_fp=ev.TaskEval(examples=20, exact_match=0.7, macro_f1=0.65, labels=2),
        task_eval_quantized=ev.TaskEval(examples=20, exact_match=0.5, macro_f1=0.4,
                                        labels=2))
    store = ArtifactStore(tmp_path / "home" / "artifacts")
    with_eval = store_export(store, trained_model.path, {
        "served_weights": "fp32", "served_reason": quantized.served_reason,
        "task_eval": quantized_run_figures(quantized)})
    without_eval = store_export(store, trained_model.path, {"served_weights": "fp32"})

    async def scenario():
        async with harness.service(GatewayService, home=tmp_path / "home",
                                   **IN_PROCESS) as gateway:
            port = gateway.http.port
            await harness.publish(exported("run-e", "v1", with_eval), "run-e:exp")
            await harness.wait_for(subjects.MODEL_DEPLOYED, 1, run_id="run-e", timeout=120)
            first = await asyncio.to_thread(_models, port)
            await harness.publish(exported("run-n", "v2", without_eval), "run-n:exp")
            await harness.wait_for(subjects.MODEL_DEPLOYED, 1, run_id="run-n", timeout=120)
            return first, await asyncio.to_thread(_models, port)

    first, second = asyncio.run(scenario())
    (listed,) = first
    assert listed["id"] == MODEL and listed["version"] == "v1"
    assert listed["task_eval"]["served"] == "fp"  # the gate failed: fp32 is served
    assert listed["task_eval"]["fp"] == {"examples": 20, "exact_match": 0.7,
                                         "macro_f1": 0.65, "labels": 2}
    assert listed["task_eval"]["awq-int4"]["exact_match"] == 0.5
    (replaced,) = second  # a new version without an eval set says so, keeps no old figure
    assert replaced["version"] == "v2" and replaced["task_eval"] is None


# Loads a model into the gateway (transformers in-process): not in `make unit`.
pytestmark = pytest.mark.processes
