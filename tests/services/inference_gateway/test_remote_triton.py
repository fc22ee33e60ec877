"""A gateway whose model lives behind a second gateway, over the KServe v2 protocol."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import pytest

from lmforge.contracts.v1 import generate_pb2, generate_pb2_grpc
from lmforge.runtime.nats_server import free_port
from services.inference_gateway.api.openai import OpenAIServer
from services.inference_gateway.engines.remote_triton import (
    RemoteTritonConfig,
    RemoteTritonEngine,
)
from services.inference_gateway.engines.torch import TorchEngine
from services.inference_gateway.registry import ModelRegistry
from tests.helpers import start_gateway


async def _generate(port, model, **fields):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        return [p async for p in stub.Generate(generate_pb2.GenerateRequest(model=model,
                                                                             **fields))]


def _remote(name: str, port: int, remote_model: str) -> RemoteTritonEngine:
    return RemoteTritonEngine(RemoteTritonConfig(name=name, url=f"127.0.0.1:{port}",
                                                 remote_model=remote_model))


def test_remote_backend_streams_what_the_remote_model_generates(trained_model):
    async def scenario():
        local = ModelRegistry()
        local.install("fortune", TorchEngine(trained_model.path, version="v1"))
        backend = await start_gateway(local, serving=True, max_concurrency=4)
        front_registry = ModelRegistry()
        front_registry.install("fortune-remote", _remote("fortune-remote", backend.port,
                                                         "fortune"))
        front = await start_gateway(front_registry, serving=True, max_concurrency=4)
        # top_k travels too (it was dropped: the remote sampled from the whole vocabulary).
        request = dict(prompt="A fortune:", max_new_tokens=12, temperature=1.5, seed=8,
                       top_k=3)
        direct = await _generate(backend.port, "fortune", **request)
        via = await _generate(front.port, "fortune-remote", **request)
        await front.stop()
        await backend.stop()
        return direct, via

    direct, via = asyncio.run(scenario())
    assert "".join(p.text for p in via) == "".join(p.text for p in direct)
    assert via[-1].finish_reason == direct[-1].finish_reason
    assert via[-1].completion_tokens == direct[-1].completion_tokens


def test_a_model_missing_on_the_remote_server_is_not_found(trained_model):
    """The remote server is up but has no such model: NOT_FOUND, as for a local model
    (it was INVALID_ARGUMENT: the client's request was not what was wrong)."""
    async def scenario():
        local = ModelRegistry()
        local.install("fortune", TorchEngine(trained_model.path, version="v1"))
        backend = await start_gateway(local, serving=True)
        front_registry = ModelRegistry()
        front_registry.install("ghost-remote", _remote("ghost-remote", backend.port, "ghost"))
        front = await start_gateway(front_registry, serving=True)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await _generate(front.port, "ghost-remote", prompt="A fortune:",
                                max_new_tokens=4)
            return missing.value
        finally:
            await front.stop()
            await backend.stop()

    missing = asyncio.run(scenario())
    assert missing.code() == grpc.StatusCode.NOT_FOUND, missing
    assert "no model 'ghost'" in (missing.details() or "")


def test_a_remote_server_that_is_down_is_unavailable_and_502_over_http():
    """Nothing listens at the remote address (connection refused): UNAVAILABLE over
    gRPC, 502 Bad Gateway over HTTP, naming the remote server."""
    down = free_port()

    async def scenario():
        registry = ModelRegistry()
        registry.install("far", _remote("far", down, "fortune"))
        front = await start_gateway(registry, serving=True)
        http = OpenAIServer(front.frontend, host="127.0.0.1", port=0, max_body_bytes=1 << 20)
        http_port = await http.start()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _generate(front.port, "far", prompt="A fortune:", max_new_tokens=4)
            async with aiohttp.ClientSession() as session, session.post(
                    f"http://127.0.0.1:{http_port}/v1/completions",
                    json={"model": "far", "prompt": "A fortune:"}) as response:
                return refused.value, response.status, await response.json()
        finally:
            await http.stop()
            await front.stop()

    refused, status, body = asyncio.run(scenario())
    assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused
    assert f"127.0.0.1:{down}" in (refused.details() or "")
    assert status == 502, body
    assert body["error"]["code"] == "upstream_failed"
