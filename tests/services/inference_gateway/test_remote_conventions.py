"""The remote backend speaks Triton's vLLM-backend and TensorRT-LLM-ensemble conventions:
exactly their tensor names, datatypes and shapes, top_k forwarded."""

from __future__ import annotations

import asyncio
import json
import struct
import threading
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from lmforge.contracts.v1 import generate_pb2, generate_pb2_grpc
from services.inference_gateway.engines.base import SamplingParams
from services.inference_gateway.engines.remote_triton import (
    RemoteTritonConfig,
    RemoteTritonEngine,
)
from services.inference_gateway.errors import UpstreamFailed
from services.inference_gateway.registry import ModelRegistry
from services.inference_gateway.settings import GatewaySettings
from tests.helpers import start_gateway

# name: (datatype, shape), as the backends' config.pbtxt declare them.
VLLM_INPUTS = {"text_input": ("BYTES", [1]), "stream": ("BOOL", [1]),
               "sampling_parameters": ("BYTES", [1]),
               "exclude_input_in_output": ("BOOL", [1])}
TRTLLM_INPUTS = {"text_input": ("BYTES", [1, 1]), "max_tokens": ("INT32", [1, 1]),
                 "temperature": ("FP32", [1, 1]), "top_p": ("FP32", [1, 1]),
                 "top_k": ("INT32", [1, 1]), "random_seed": ("UINT64", [1, 1]),
                 "stream": ("BOOL", [1, 1])}
NUMPY = {"BOOL": np.bool_, "INT32": "<i4", "FP32": "<f4", "UINT64": "<u8"}
PIECES = ["Fortune ", "favours ", "the ", "bold."]


def _bytes_elements(raw: bytes) -> list[bytes]:
    """Triton's BYTES wire format: a 4-byte little-endian length before each element."""
    out, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        out.append(raw[offset + 4:offset + 4 + length])
        offset += 4 + length
    return out


class LlmBackendServicer(pb_grpc.GRPCInferenceServiceServicer):
    """A stand-in for Triton serving one LLM backend's model (no tritonserver binary runs
    here). It checks every request's tensors against the convention exactly — the set of
    names, each datatype and shape — and refuses any other request with an error message,
    as Triton does; it records the values it was sent and streams PIECES back the way
    the backends do in streaming mode: one text_output delta per response, the last
    flagged `triton_final_response` (or, with `final_flag_alone`, none flagged: the
    server sent the final flag without a response, which the client is not sent)."""

    def __init__(self, model: str, inputs: dict[str, tuple[str, list[int]]],
                 output_shape: list[int], *, final_flag_alone: bool = False) -> None:
        self.model, self.inputs, self.output_shape = model, inputs, output_shape
        self.final_flag_alone = final_flag_alone
        self.received: list[dict[str, object]] = []

    def _values(self, request: pb.ModelInferRequest) -> dict[str, object] | str:
        sent = {t.name: (t.datatype, list(t.shape)) for t in request.inputs}
        if set(sent) != set(self.inputs):
            return (f"inputs {sorted(sent)} are not the model's {sorted(self.inputs)}: "
                    f"unexpected {sorted(set(sent) - set(self.inputs))}, missing "
                    f"{sorted(set(self.inputs) - set(sent))}")
        for name, (datatype, shape) in sent.items():
            if (datatype, shape) != self.inputs[name]:
                return f"input {name!r} is {datatype}{shape}; expected {self.inputs[name]}"
        values: dict[str, object] = {}
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
            if tensor.datatype == "BYTES":
                elements = _bytes_elements(raw)
            else:
                elements = np.frombuffer(raw, dtype=NUMPY[tensor.datatype]).tolist()
            if len(elements) != 1:
                return f"input {tensor.name!r} holds {len(elements)} elements"
            values[tensor.name] = elements[0]
        return values

    def _response(self, request: pb.ModelInferRequest, text: str, final: bool
                  ) -> pb.ModelStreamInferResponse:
        payload = text.encode()
        response = pb.ModelInferResponse(
            model_name=request.model_name, id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(
                name="text_output", datatype="BYTES", shape=self.output_shape)],
            raw_output_contents=[struct.pack("<I", len(payload)) + payload])
        response.parameters["triton_final_response"].bool_param = final
        return pb.ModelStreamInferResponse(infer_response=response)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == self.model)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            values = self._values(request)
            if isinstance(values, str):
                yield pb.ModelStreamInferResponse(error_message=values)
                continue
            self.received.append(values)
            for i, text in enumerate(PIECES):
                last = i == len(PIECES) - 1 and not self.final_flag_alone
                yield self._response(request, text, last)


async def _serve(servicer: LlmBackendServicer) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _generate_remote(servicer: LlmBackendServicer, convention: str,
                     params: SamplingParams) -> list:
    async def scenario():
        server, port = await _serve(servicer)
        engine = RemoteTritonEngine(RemoteTritonConfig(
            name="far", url=f"127.0.0.1:{port}", remote_model=servicer.model,
            convention=convention))
        try:
            prompt = engine.encode_prompt("A fortune:")
            return [p async for p in engine.astream(prompt, params, threading.Event())]
        finally:
            await server.stop(None)

    return asyncio.run(scenario())


def _vllm() -> LlmBackendServicer:
    return LlmBackendServicer("vllm_model", VLLM_INPUTS, [1])


def _trtllm(**kwargs) -> LlmBackendServicer:
    return LlmBackendServicer("ensemble", TRTLLM_INPUTS, [1, 1], **kwargs)


SAMPLED = SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.9, top_k=40, seed=11)


def test_vllm_convention_sends_exactly_its_tensors_and_streams_the_deltas():
    servicer = _vllm()
    pieces = _generate_remote(servicer, "vllm", SAMPLED)
    assert "".join(p.text for p in pieces) == "".join(PIECES)
    assert [p.finish_reason for p in pieces] == ["", "", "", "stop"]
    (sent,) = servicer.received
    assert sent["text_input"] == b"A fortune:"
    assert sent["stream"] is True and sent["exclude_input_in_output"] is True
    sampling = json.loads(sent["sampling_parameters"])
    assert sampling == {"max_tokens": 16, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
                        "seed": 11}


def test_vllm_greedy_sends_no_seed_and_disables_top_k_and_top_p_its_way():
    servicer = _vllm()
    _generate_remote(servicer, "vllm", SamplingParams(max_new_tokens=8, top_p=0.0))
    sampling = json.loads(servicer.received[0]["sampling_parameters"])
    assert sampling == {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "top_k": -1}


def test_trtllm_ensemble_convention_sends_exactly_its_tensors_with_top_k():
    servicer = _trtllm()
    pieces = _generate_remote(servicer, "trtllm", SAMPLED)
    assert "".join(p.text for p in pieces) == "".join(PIECES)
    assert pieces[-1].finish_reason == "stop" and pieces[-1].completion_tokens == 4
    (sent,) = servicer.received
    assert sent["text_input"] == b"A fortune:"
    assert sent["max_tokens"] == 16 and sent["top_k"] == 40 and sent["random_seed"] == 11
    assert sent["temperature"] == pytest.approx(0.7) and sent["top_p"] == pytest.approx(0.9)
    assert sent["stream"] is True


def test_trtllm_greedy_is_top_k_1_and_an_unseeded_request_gets_a_fresh_seed():
    servicer = _trtllm()
    _generate_remote(servicer, "trtllm", SamplingParams(max_new_tokens=8))
    _generate_remote(servicer, "trtllm", SamplingParams(max_new_tokens=8))
    first, second = servicer.received
    assert (first["top_k"], first["temperature"], first["top_p"]) == (1, 1.0, 1.0)
    # TensorRT-LLM's own default seed is a fixed 0: "no seed" must not mean "seed 0".
    assert first["random_seed"] != second["random_seed"]


def test_a_stream_that_ends_without_a_flagged_response_still_ends_the_generation():
    pieces = _generate_remote(_trtllm(final_flag_alone=True), "trtllm", SAMPLED)
    assert "".join(p.text for p in pieces) == "".join(PIECES)
    assert [p.finish_reason for p in pieces][-2:] == ["", "stop"]
    assert pieces[-1].completion_tokens == 4


def test_a_request_in_another_convention_is_refused_by_the_servicer():
    """The servicer really checks: the lmforge convention's tensors are not vLLM's."""
    with pytest.raises(UpstreamFailed, match=r"unexpected .*'max_tokens'"):
        _generate_remote(_vllm(), "lmforge", SAMPLED)


def test_top_k_travels_from_a_client_through_the_gateway_to_the_remote_model():
    servicer = _trtllm()

    async def scenario():
        server, port = await _serve(servicer)
        registry = ModelRegistry()
        registry.install("far", RemoteTritonEngine(RemoteTritonConfig.parse(
            f"far=127.0.0.1:{port}/ensemble@trtllm")))
        front = await start_gateway(registry, serving=True)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{front.port}") as channel:
                stub = generate_pb2_grpc.GeneratorStub(channel)
                request = generate_pb2.GenerateRequest(
                    model="far", prompt="A fortune:", max_new_tokens=12, temperature=0.5,
                    top_k=7, seed=3)
                return [p async for p in stub.Generate(request)]
        finally:
            await front.stop()
            await server.stop(None)

    pieces = asyncio.run(scenario())
    assert "".join(p.text for p in pieces) == "".join(PIECES)
    (sent,) = servicer.received
    assert (sent["top_k"], sent["max_tokens"], sent["random_seed"]) == (7, 12, 3)


def test_the_convention_is_part_of_the_remote_models_setting():
    settings = GatewaySettings(gateway_remote_models="a=h:1/m@vllm,b=h:2/ensemble@trtllm,"
                               "c=h:3/fortune")
    assert [m.convention for m in settings.gateway_remote_models] == [
        "vllm", "trtllm", "lmforge"]
    with pytest.raises(ValueError, match="convention 'tgi' is not one of"):
        GatewaySettings(gateway_remote_models="a=h:1/m@tgi")
    with pytest.raises(ValueError, match=r"\[@convention\]"):
        GatewaySettings(gateway_remote_models="a=h:1/m@")
