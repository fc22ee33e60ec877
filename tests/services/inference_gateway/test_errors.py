"""Failures reach every client with the status that says what happened, and are counted.

A real engine process, killed with SIGKILL, behind the real gRPC server (native
Generate and KServe v2) and the real OpenAI HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from prometheus_client import REGISTRY
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from lmforge.contracts.v1 import generate_pb2, generate_pb2_grpc
from services.inference_gateway.api.openai import OpenAIServer
from services.inference_gateway.engines.process import EngineProcess
from services.inference_gateway.registry import ModelRegistry
from tests.helpers import start_gateway


@pytest.fixture(scope="module")
def engine(trained_model):
    engine = EngineProcess(trained_model.path, version="v1", max_batch=4)
    yield engine
    engine.close()


def requests_counted(model: str, protocol: str, code: str) -> float:
    return REGISTRY.get_sample_value("lmforge_gateway_requests_total",
                                     {"model": model, "protocol": protocol, "code": code}) or 0.0


def _kill_engine_process(engine: EngineProcess) -> None:
    """kill -9 of the child; returns once it is dead (its replacement is still starting)."""
    engine.process.kill()
    engine.process.join(10)


def _wait_for_restart(engine: EngineProcess, restarts: int) -> None:
    deadline = time.monotonic() + 120
    while engine.restarts <= restarts or not engine.process.is_alive():
        assert time.monotonic() < deadline, "no new engine process"
        time.sleep(0.2)


async def _native(port: int, **fields: object) -> tuple[grpc.StatusCode, str, list[str]]:
    """A Generate call: its status, details and the text pieces that came before it."""
    texts: list[str] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        try:
            async for piece in stub.Generate(generate_pb2.GenerateRequest(**fields)):
                texts.append(piece.text)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or "", texts
    return grpc.StatusCode.OK, "", texts


async def _kserve(port: int, model: str, prompt: str) -> tuple[str, str]:
    """A KServe v2 ModelInfer call: its status and message ("OK", "" when it succeeds)."""
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{port}")
    text = InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    try:
        await client.infer(model, [text])
    except InferenceServerException as exc:
        return str(exc.status()), exc.message()
    finally:
        await client.close()
    return "OK", ""


async def _http(port: int, body: dict[str, object]) -> tuple[int, dict[str, str], bytes]:
    """POST /v1/completions: status, headers, body."""
    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{port}/v1/completions", json=body) as response:
        return response.status, dict(response.headers), await response.read()


async def _serving(engine: EngineProcess):
    registry = ModelRegistry()
    registry.install("m", engine)
    grpc_server = await start_gateway(registry, serving=True, max_concurrency=4)
    http = OpenAIServer(grpc_server.frontend, host="127.0.0.1", port=0, max_body_bytes=1 << 20)
    return grpc_server, http, await http.start()


def test_a_killed_engine_process_is_unavailable_to_every_protocol_with_retry_after(engine):
    """kill -9 of the engine child: while it restarts, requests are UNAVAILABLE over
    gRPC (native and KServe) and 503 with Retry-After over HTTP, not UNKNOWN / 500."""
    restarts = engine.restarts

    async def scenario():
        grpc_server, http, http_port = await _serving(engine)
        try:
            _kill_engine_process(engine)
            return await asyncio.gather(
                _native(grpc_server.port, model="m", prompt="The", max_new_tokens=5),
                _kserve(grpc_server.port, "m", "The"),
                _http(http_port, {"model": "m", "prompt": "The", "max_tokens": 5}))
        finally:
            await http.stop()
            await grpc_server.stop()

    before = requests_counted("m", "native", "UNAVAILABLE")
    (code, details, _), (kserve_status, kserve_message), (status, headers, body) = \
        asyncio.run(scenario())
    assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
    assert "engine process" in details and "retry" in details
    assert "UNAVAILABLE" in kserve_status, (kserve_status, kserve_message)
    assert status == 503, (status, body)
    assert int(headers["Retry-After"]) > 0
    error = json.loads(body)["error"]
    assert error["code"] == "engine_unavailable" and "engine process" in error["message"]
    assert requests_counted("m", "native", "UNAVAILABLE") == before + 1
    _wait_for_restart(engine, restarts)


def test_an_engine_killed_mid_stream_ends_the_stream_unavailable_and_it_is_counted(engine):
    """The child dies after the first piece: the native stream ends with UNAVAILABLE and
    the outcome is counted under its protocol and code; the next request is served."""
    restarts = engine.restarts

    async def scenario():
        grpc_server, http, _ = await _serving(engine)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_server.port}") as channel:
                stub = generate_pb2_grpc.GeneratorStub(channel)
                call = stub.Generate(generate_pb2.GenerateRequest(
                    model="m", prompt="The", max_new_tokens=60))
                first = await call.read()
                _kill_engine_process(engine)
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    while await call.read() != grpc.aio.EOF:
                        pass
            await asyncio.to_thread(_wait_for_restart, engine, restarts)
            after = await _native(grpc_server.port, model="m", prompt="Life is",
                                  max_new_tokens=4)
            return first, ended.value, after
        finally:
            await http.stop()
            await grpc_server.stop()

    before = requests_counted("m", "native", "UNAVAILABLE")
    first, ended, (code_after, _, texts_after) = asyncio.run(scenario())
    assert first.text is not None and not first.finish_reason
    assert ended.code() == grpc.StatusCode.UNAVAILABLE, ended
    assert "exited" in (ended.details() or "")
    assert requests_counted("m", "native", "UNAVAILABLE") == before + 1
    assert code_after == grpc.StatusCode.OK and texts_after


def test_every_outcome_is_counted_by_model_protocol_and_code(engine):
    """Refusals at parsing, in the frontend and in the engine count as much as successes."""
    async def scenario():
        grpc_server, http, http_port = await _serving(engine)
        try:
            await _native(grpc_server.port, model="m", prompt="The", max_new_tokens=2)
            await _native(grpc_server.port, model="ghost", prompt="The")
            await _native(grpc_server.port, model="m", prompt="")
            await _kserve(grpc_server.port, "m", "The")
            await _kserve(grpc_server.port, "ghost", "The")
            await _http(http_port, {"model": "m", "prompt": "The", "max_tokens": 2})
            await _http(http_port, {"model": "m", "prompt": "The", "max_tokens": 0})
            await _http(http_port, {"model": "ghost", "prompt": "The"})
        finally:
            await http.stop()
            await grpc_server.stop()

    labels = [("m", "native", "OK"), ("ghost", "native", "NOT_FOUND"),
              ("m", "native", "INVALID_ARGUMENT"), ("m", "kserve", "OK"),
              ("ghost", "kserve", "NOT_FOUND"), ("m", "openai", "OK"),
              ("m", "openai", "INVALID_ARGUMENT"), ("ghost", "openai", "NOT_FOUND")]
    before = {label: requests_counted(*label) for label in labels}
    asyncio.run(scenario())
    assert {label: requests_counted(*label) - before[label] for label in labels} == {
        label: 1.0 for label in labels}


# Starts child processes (engine processes, the CLI, model exports): not in `make unit`.
pytestmark = pytest.mark.processes
