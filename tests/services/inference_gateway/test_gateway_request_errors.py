"""Requests the gateway cannot serve as sent get 400 / INVALID_ARGUMENT, never a 500 or
UNKNOWN; a client that hangs up on an event stream is one log line, not a traceback.

The real gRPC and HTTP servers on 127.0.0.1 with the real tiny model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest
from prometheus_client import REGISTRY, generate_latest
from tritonclient.grpc import service_pb2 as kserve_pb

from lmforge.contracts.v1 import generate_pb2
from services.inference_gateway.api.openai import OpenAIServer
from services.inference_gateway.engines.base import EncodedPrompt, Piece, SamplingParams
from services.inference_gateway.engines.torch import TorchEngine
from services.inference_gateway.frontend import GenerationFrontend, Limits
from services.inference_gateway.registry import ModelRegistry
from tests.helpers import start_gateway


@pytest.fixture(scope="module")
def engine(trained_model):
    return TorchEngine(trained_model.path, version="v1")


def requests_counted(model: str, protocol: str, code: str) -> float:
    return REGISTRY.get_sample_value("lmforge_gateway_requests_total",
                                     {"model": model, "protocol": protocol, "code": code}) or 0.0


def _message(field: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (a string, bytes or message) as raw bytes."""
    assert len(payload) < 128
    return bytes([field << 3 | 2, len(payload)]) + payload


def test_a_grpc_string_that_is_not_utf8_is_invalid_argument_and_counted(engine):
    """Bytes that no client library would send, but a socket can: each call is refused with
    INVALID_ARGUMENT saying why, and the gateway goes on serving."""
    generate = _message(1, b"m") + _message(2, b"The \xff\xfe wise")  # prompt not UTF-8
    infer = _message(1, b"m\xc3(")  # KServe ModelInferRequest.model_name not UTF-8

    async def scenario():
        registry = ModelRegistry()
        registry.install("m", engine)
        server = await start_gateway(registry, serving=True)
        got = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            calls = [
                channel.unary_stream("/lmforge.v1.Generator/Generate",
                                     response_deserializer=generate_pb2.GenerateResponse.FromString),
                channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    response_deserializer=kserve_pb.ModelInferResponse.FromString),
            ]
            for call, raw in zip(calls, (generate, infer), strict=True):
                try:
                    result = call(raw, timeout=30)
                    if hasattr(result, "__aiter__"):
                        _ = [r async for r in result]
                    else:
                        await result
                    got.append((grpc.StatusCode.OK, ""))
                except grpc.aio.AioRpcError as exc:
                    got.append((exc.code(), exc.details() or ""))
            good = channel.unary_stream(
                "/lmforge.v1.Generator/Generate",
                request_serializer=generate_pb2.GenerateRequest.SerializeToString,
                response_deserializer=generate_pb2.GenerateResponse.FromString)
            pieces = [p async for p in good(generate_pb2.GenerateRequest(
                model="m", prompt="The wise", max_new_tokens=3))]
        await server.stop()
        return got, pieces

    native_before = requests_counted("", "native", "INVALID_ARGUMENT")
    kserve_before = requests_counted("", "kserve", "INVALID_ARGUMENT")
    got, pieces = asyncio.run(scenario())
    for code, details in got:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert "not valid UTF-8" in details
    assert pieces[-1].finish_reason
    assert requests_counted("", "native", "INVALID_ARGUMENT") == native_before + 1
    assert requests_counted("", "kserve", "INVALID_ARGUMENT") == kserve_before + 1


BAD_BODIES = [  # raw JSON: Python's own json module would not write some of these
    ('{"model": "m", "prompt": "hi", "max_tokens": 1e400}', "max_tokens must be an integer"),
    ('{"model": "m", "prompt": "hi", "max_tokens": 1.5}', "max_tokens must be an integer"),
    ('{"model": "m", "prompt": "hi", "max_tokens": NaN}', "max_tokens must be an integer"),
    ('{"model": "m", "prompt": "hi", "max_tokens": 100000000000000000000}', "max_new_tokens"),
    (f'{{"model": "m", "prompt": "hi", "seed": {2**100}}}', "seed"),
    (f'{{"model": "m", "prompt": "hi", "seed": {2**64}}}', "seed"),
    ('{"model": "m", "prompt": "hi", "seed": -1}', "seed"),
    ('{"model": "m", "prompt": "hi", "seed": 0.5}', "seed must be an integer"),
    (f'{{"model": "m", "prompt": "hi", "top_k": {2**40}}}', "top_k"),
    ('{"model": "m", "prompt": "hi", "top_k": 2.5}', "top_k must be an integer"),
    ('{"model": "m", "prompt": "hi", "temperature": 1e400}', "temperature"),
    ('{"model": "m", "prompt": "hi", "temperature": NaN}', "temperature"),
    (f'{{"model": "m", "prompt": "hi", "top_p": {10**400}}}', "top_p"),
    ('{"model": "m", "prompt": "hi", "top_p": -Infinity}', "top_p"),
    ('{"model": "m", "prompt": "hi", "n": 2}', "n must be 1"),
    ('{"model": "m", "prompt": "hi \\ud800 there"}', "lone surrogate U+D800"),
    ('{"model": "m", "prompt": "hi", "stop": ["\\udfff"]}', "lone surrogate U+DFFF"),
    ('{"model": "m", "messages": [{"role": "user", "content": "a\\ud83d"}]}', "lone surrogate"),
]


def test_http_numbers_must_be_integers_in_range_and_text_valid_unicode(engine):
    """Each bad field is a 400 that names it; integral numbers written as 2.0 are fine; a
    model name with a lone surrogate is a 404 and leaves /metrics readable."""
    async def scenario():
        registry = ModelRegistry()
        registry.install("m", engine)
        frontend = GenerationFrontend(registry, Limits(max_new_tokens=64, max_concurrency=2,
                                                       max_queue=4, max_prompt_chars=2000))
        server = OpenAIServer(frontend, host="127.0.0.1", port=0, max_body_bytes=1 << 20)
        port = await server.start()
        base = f"http://127.0.0.1:{port}/v1"
        results = []
        try:
            async with aiohttp.ClientSession() as session:
                for body, _ in [*BAD_BODIES, (
                        '{"model": "m", "prompt": "hi", "max_tokens": 2.0, "seed": 7.0, '
                        '"top_k": 5, "n": 1, "temperature": 0.5}', ""), (
                        '{"model": "\\ud800", "prompt": "hi"}', "")]:
                    path = "/chat/completions" if '"messages"' in body else "/completions"
                    async with session.post(base + path, data=body.encode(), headers={
                            "Content-Type": "application/json"}) as response:
                        results.append((response.status, await response.text()))
        finally:
            await server.stop()
        return results

    *bad, good, ghost = asyncio.run(scenario())
    for (body, expected), (status, text) in zip(BAD_BODIES, bad, strict=True):
        assert status == 400, (body, status, text)
        error = json.loads(text)["error"]
        assert error["type"] == "invalid_request_error" and expected in error["message"], (
            body, error)
    assert good[0] == 200, good
    assert json.loads(good[1])["usage"]["completion_tokens"] <= 2
    assert ghost[0] == 404, ghost
    assert b"lmforge_gateway_requests_total" in generate_latest()  # still renders


class PacedEngine:
    """The real engine, one piece every 50 ms, counting the pieces it made."""

    int4_report = None

    def __init__(self, engine: TorchEngine) -> None:
        self.engine = engine
        self.version = engine.version
        self.pieces = 0

    def encode_prompt(self, prompt: str) -> EncodedPrompt:
        return self.engine.encode_prompt(prompt)

    async def astream(self, prompt: EncodedPrompt, params: SamplingParams,
                      cancelled: threading.Event) -> AsyncIterator[Piece]:
        async for piece in self.engine.astream(prompt, params, cancelled):
            self.pieces += 1
            yield piece
            await asyncio.sleep(0.05)

    def retire(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_client_that_closes_an_event_stream_is_one_info_line_not_a_traceback(
        engine, caplog):
    paced = PacedEngine(engine)
    caplog.set_level(logging.INFO)

    async def scenario():
        registry = ModelRegistry()
        registry.install("m", paced)
        frontend = GenerationFrontend(registry, Limits(max_new_tokens=64, max_concurrency=2,
                                                       max_queue=4, max_prompt_chars=2000))
        server = OpenAIServer(frontend, host="127.0.0.1", port=0, max_body_bytes=1 << 20)
        port = await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                response = await session.post(
                    f"http://127.0.0.1:{port}/v1/completions",
                    json={"model": "m", "prompt": "The wise", "max_tokens": 60,
                          "temperature": 0.9, "seed": 3, "stream": True})
                first = await response.content.readline()
                response.close()  # hang up mid-stream
            await asyncio.sleep(1.5)  # the server's next write finds the connection gone
        finally:
            await server.stop()
        return first

    cancelled_before = requests_counted("m", "openai", "CANCELLED")
    first = asyncio.run(scenario())
    assert first.startswith(b"data: ")
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert loud == [], [(r.name, r.getMessage()) for r in loud]
    lines = [r.getMessage() for r in caplog.records if "closed the connection" in
             r.getMessage()]
    assert len(lines) == 1, lines
    assert paced.pieces < 60, "the generation went on after the client left"
    assert requests_counted("m", "openai", "CANCELLED") == cancelled_before + 1
