"""A gateway whose model lives behind a second gateway, over the KServe v2 protocol."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from lmforge.contracts.v1 import generate_pb2, generate_pb2_grpc
from services.inference_gateway.engines.remote_triton import RemoteTritonEngine
from services.inference_gateway.engines.torch import GenerationEngine
from services.inference_gateway.registry import ModelRegistry
from tests.helpers import start_gateway


async def _generate(port, model, **fields):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        return [p async for p in stub.Generate(generate_pb2.GenerateRequest(model=model,
                                                                             **fields))]


def test_remote_backend_streams_what_the_remote_model_generates(trained_model):
    async def scenario():
        local = ModelRegistry()
        local.install("fortune", GenerationEngine(trained_model.path, version="v1"))
        backend = await start_gateway(local, serving=True, max_concurrency=4)
        front_registry = ModelRegistry()
        front_registry.install("fortune-remote", RemoteTritonEngine(
            f"127.0.0.1:{backend.port}", "fortune"))
        front_registry.install("ghost-remote", RemoteTritonEngine(
            f"127.0.0.1:{backend.port}", "ghost"))
        front = await start_gateway(front_registry, serving=True, max_concurrency=4)
        request = dict(prompt="A fortune:", max_new_tokens=12, temperature=0.9, seed=8)
        direct = await _generate(backend.port, "fortune", **request)
        via = await _generate(front.port, "fortune-remote", **request)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await _generate(front.port, "ghost-remote", **request)
        await front.stop()
        await backend.stop()
        return direct, via, missing.value

    direct, via, missing = asyncio.run(scenario())
    assert "".join(p.text for p in via) == "".join(p.text for p in direct)
    assert via[-1].finish_reason == direct[-1].finish_reason
    assert via[-1].completion_tokens == direct[-1].completion_tokens
    assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "remote model 'ghost'" in missing.details()
