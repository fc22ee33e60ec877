"""The gateway serves the packed int4 model on torch's int4 CPU kernel, and its greedy
generations are those of the same weights dequantised, over gRPC and OpenAI HTTP."""

from __future__ import annotations

import asyncio
import json
import shutil

import grpc
import openai
import pytest
import torch

from lmforge.contracts.v1 import generate_pb2, generate_pb2_grpc
from lmforge.modeling import load_causal_lm, load_dequantized_model, load_tokenizer
from services.inference_gateway.api.openai import OpenAIServer
from services.inference_gateway.engines import served_precision
from services.inference_gateway.engines.int4_model import (
    Int4Linear,
    dequantised_report,
    load_int4_model,
)
from services.inference_gateway.engines.int4_report import Int4Report
from services.inference_gateway.engines.process import EngineProcess
from services.inference_gateway.engines.torch import load_serving_model
from services.inference_gateway.frontend import GenerationFrontend, Limits
from services.inference_gateway.registry import ModelRegistry
from services.inference_gateway.settings import GatewaySettings
from services.quantizer.int4 import choose_group_size, quantize
from services.quantizer.judged import QuantizeConfig, quantize_and_judge
from services.quantizer.packed_model import write_int4_model
from services.quantizer.rtn import quantizable
from tests.helpers import start_gateway

PROMPT = "The wise man"
TOKENS = 32


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory, trained_model, prepared_dataset):
    out = tmp_path_factory.mktemp("int4") / "hf"
    quantize_and_judge(trained_model.path, prepared_dataset.path, out,
                       QuantizeConfig(max_ppl_increase=1.0, calibration_samples=8))
    (out.parent / "export.json").write_text(json.dumps({"served_weights": "int4-awq-g128",
                                                        "served_reason": ""}))
    return out


def _reference_text(int4_dir) -> str:
    """Greedy decoding by the transformers model on the dequantised weights, the whole
    sequence recomputed at each step (no cache, no kernel of ours)."""
    model = load_dequantized_model(int4_dir)
    tokenizer = load_tokenizer(int4_dir)
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(TOKENS):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == model.config.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new)


def test_the_packed_model_runs_int4_linears_with_no_fp_weight_held(int4_dir):
    model = load_serving_model(int4_dir, "fp32", "cpu")
    linears = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(linears) == 2 * 7
    held = {name for name, _ in model.named_parameters()}
    assert not any(".layers." in name and name.endswith("proj.weight") for name in held)


def test_a_layer_whose_kernel_fails_its_check_is_served_dequantised_and_named(
        int4_dir, monkeypatch, caplog):
    real = Int4Linear._matmul

    def wrong_for_down(self, rows):  # a kernel that gets the MLP's down projection wrong
        out = real(self, rows)
        return out * 1.5 if self.out_features < self.in_features else out

    monkeypatch.setattr(Int4Linear, "_matmul", wrong_for_down)
    with caplog.at_level("WARNING", logger="lmforge.gateway.int4"):
        model, report = load_int4_model(int4_dir, torch.float32)
    assert list(report.dequantised) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert report.layers == 2 * 7
    assert "2 of 14 int4 layers served dequantised to fp32" in caplog.text
    assert "differs from the dequantised weight" in caplog.text
    assert "model.layers.1.mlp.down_proj" in caplog.text
    reference = load_dequantized_model(int4_dir)
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    with torch.inference_mode():
        got, expected = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=5e-2, rtol=5e-2)
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 2 * 6
    # What /v1/models, model.deployed and `lmforge status` say of it.
    precision, reason = served_precision(GatewaySettings(), int4_dir.parent, report)
    assert precision == "int4-awq-g128"
    assert reason.startswith("2 of 14 int4 layers served dequantised to fp32: the int4 CPU "
                             "kernel's output differs from the dequantised weight's")


def test_a_qwen2_model_with_biased_projections_is_served_int4(base_models, tmp_path):
    source = base_models["qwen2"]  # sharded, with q/k/v biases
    state = load_causal_lm(source).state_dict()
    weights = {name: quantize(t, choose_group_size(t.shape[1], 128))
               for name, t in state.items() if quantizable(name, t)}
    write_int4_model(source, tmp_path / "q", state, weights, group_size=128, metadata={})
    assert not (tmp_path / "q" / "model.safetensors.index.json").exists()
    model, report = load_int4_model(tmp_path / "q", torch.float32)
    assert report.layers == 2 * 7 and not report.dequantised
    biased = [m for m in model.modules() if isinstance(m, Int4Linear) and m.bias is not None]
    assert len(biased) == 2 * 3
    reference = load_dequantized_model(tmp_path / "q")
    ids = torch.tensor([[5, 9, 14, 3, 7, 21]])
    with torch.inference_mode():
        got, expected = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=2e-2, rtol=2e-2)


def test_greedy_int4_generations_match_the_dequantised_reference_over_grpc_and_http(
        int4_dir):
    expected = _reference_text(int4_dir)
    engine = EngineProcess(int4_dir, version="int4", max_batch=4)

    async def scenario():
        registry = ModelRegistry()
        registry.install("fortune", engine)
        registry.record_precision("fortune", "int4", *served_precision(
            GatewaySettings(), int4_dir.parent, engine.int4_report))
        server = await start_gateway(registry, serving=True)
        frontend = GenerationFrontend(registry, Limits(max_new_tokens=64, max_concurrency=4,
                                                       max_queue=4, max_prompt_chars=2000))
        http = OpenAIServer(frontend, host="127.0.0.1", port=0, max_body_bytes=1 << 20)
        port = await http.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = generate_pb2_grpc.GeneratorStub(channel)
                pieces = [p async for p in stub.Generate(generate_pb2.GenerateRequest(
                    model="fortune", prompt=PROMPT, max_new_tokens=TOKENS, temperature=0,
                    seed=7))]

            def over_http():
                client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                                       api_key="unused", max_retries=0)
                done = client.completions.create(model="fortune", prompt=PROMPT,
                                                 max_tokens=TOKENS, temperature=0, seed=7)
                listed = client.models.list().model_dump()["data"]
                return done.choices[0].text, listed

            return "".join(p.text for p in pieces), *await asyncio.to_thread(over_http)
        finally:
            await http.stop()
            await server.stop()

    try:
        grpc_text, http_text, listed = asyncio.run(scenario())
    finally:
        engine.close()
    assert len(expected) > 20  # a real generation, not an immediate end
    assert engine.int4_report == Int4Report(layers=14)  # from the engine process's load
    assert grpc_text == expected
    assert http_text == expected
    assert listed[0]["precision"] == "int4-awq-g128"


def test_served_precision_says_int4_on_the_cpu_and_why_not_elsewhere(tmp_path, int4_dir):
    shutil.copytree(int4_dir, tmp_path / "hf")
    (tmp_path / "export.json").write_text(json.dumps({"served_weights": "int4-awq-g128",
                                                      "served_reason": ""}))
    assert served_precision(GatewaySettings(), tmp_path) == ("int4-awq-g128", "")
    precision, reason = served_precision(GatewaySettings(gateway_backend="onnx"), tmp_path)
    assert precision == "fp32" and "onnxruntime" in reason
    # A GPU the kernel does not run on: every layer dequantised, as its load reported.
    everything = dequantised_report(tmp_path / "hf", "the GPU is sm_75")
    assert everything.layers == 2 * 7
    assert served_precision(GatewaySettings(gateway_dtype="bf16"), tmp_path, everything) == (
        "bf16", "int4-awq-g128 weights dequantised to bf16 at load: the GPU is sm_75")


pytestmark = pytest.mark.processes
