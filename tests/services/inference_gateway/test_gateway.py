"""The gateway's gRPC surface on 127.0.0.1 with a real trained model."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lmforge.contracts.v1 import generate_pb2, generate_pb2_grpc
from services.inference_gateway.engines.base import EncodedPrompt, Piece, SamplingParams
from services.inference_gateway.engines.torch import TorchEngine
from services.inference_gateway.registry import ModelRegistry
from tests.helpers import start_gateway


@pytest.fixture(scope="module")
def engine(trained_model):
    return TorchEngine(trained_model.path, version="v1")


def test_sampling_is_reproducible_with_a_seed_and_greedy_is_deterministic(engine):
    ids = engine.encode_prompt("The wise man")

    def text(params):
        return "".join(p.text for p in engine.stream(ids, params))

    sampled = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=42)
    assert text(sampled) == text(sampled)
    assert text(SamplingParams(max_new_tokens=20)) == text(SamplingParams(max_new_tokens=20))
    other = [text(SamplingParams(max_new_tokens=20, temperature=1.0, seed=s)) for s in (1, 2, 3)]
    assert len(set(other)) > 1


def test_generate_streams_health_flips_and_reflection_lists_services(engine):
    async def scenario():
        registry = ModelRegistry()
        server = await start_gateway(registry)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            before = await health.Check(health_pb2.HealthCheckRequest(service=""))
            registry.install("fortune", engine)
            await server.set_serving(True)
            after = await health.Check(health_pb2.HealthCheckRequest(
                service="lmforge.v1.Generator"))
            stub = generate_pb2_grpc.GeneratorStub(channel)
            pieces = [p async for p in stub.Generate(generate_pb2.GenerateRequest(
                model="fortune", prompt="Life is", max_new_tokens=12, temperature=0.7,
                top_p=0.9, seed=3))]
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            listed = []
            async for r in refl.ServerReflectionInfo(iter([
                    reflection_pb2.ServerReflectionRequest(list_services="")])):
                listed = [s.name for s in r.list_services_response.service]
        await server.stop()
        return before, after, pieces, listed

    before, after, pieces, listed = asyncio.run(scenario())
    assert before.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert after.status == health_pb2.HealthCheckResponse.SERVING
    assert pieces[-1].finish_reason in ("length", "eos")
    assert all(not p.finish_reason for p in pieces[:-1])
    assert 1 <= pieces[-1].completion_tokens <= 12
    assert "".join(p.text for p in pieces)
    assert {"lmforge.v1.Generator", "grpc.health.v1.Health"} <= set(listed)


def test_bad_requests_get_the_right_status_and_the_gateway_keeps_serving(engine):
    cases = [
        (dict(model="nope", prompt="hi"), grpc.StatusCode.NOT_FOUND, "not served here"),
        (dict(model="m", prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        (dict(model="m", prompt="hi", max_new_tokens=-3), grpc.StatusCode.INVALID_ARGUMENT,
         "max_new_tokens -3 must be in 1..64"),
        (dict(model="m", prompt="hi", max_new_tokens=10_000_000),
         grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        (dict(model="m", prompt="word " * 150), grpc.StatusCode.INVALID_ARGUMENT,
         "exceeds the model's context"),
        (dict(model="m", prompt="x" * 5000), grpc.StatusCode.INVALID_ARGUMENT,
         "the limit is 1000"),
        (dict(model="m", prompt="hi", top_p=3), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        # A 100 MB request against the 1 MB cap.
        (dict(model="m", prompt="y" * (100 << 20)), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ]

    async def scenario():
        registry = ModelRegistry()
        registry.install("m", engine)
        server = await start_gateway(registry, max_prompt_chars=1000)
        got = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = generate_pb2_grpc.GeneratorStub(channel)
            for fields, _, _ in cases:
                try:
                    async for _ in stub.Generate(generate_pb2.GenerateRequest(**fields)):
                        pass
                    got.append((grpc.StatusCode.OK, ""))
                except grpc.aio.AioRpcError as exc:
                    got.append((exc.code(), exc.details()))
            ok = [p async for p in stub.Generate(generate_pb2.GenerateRequest(
                model="m", prompt="still", max_new_tokens=3))]
        await server.stop()
        return got, ok

    got, ok = asyncio.run(scenario())
    for (fields, code, message), (got_code, details) in zip(cases, got, strict=True):
        assert got_code == code, (fields.get("prompt", "")[:20], got_code, details)
        assert message in (details or ""), details
    assert ok[-1].finish_reason


class GatedEngine:
    """The real engine, but each stream waits at a gate first: holds slots on demand."""

    int4_report = None

    def __init__(self, engine: TorchEngine) -> None:
        self.engine = engine
        self.version = engine.version
        self.gate = threading.Event()

    def encode_prompt(self, prompt: str) -> EncodedPrompt:
        return self.engine.encode_prompt(prompt)

    async def astream(self, prompt: EncodedPrompt, params: SamplingParams,
                      cancelled: threading.Event) -> AsyncIterator[Piece]:
        while not self.gate.is_set():
            if cancelled.is_set():
                return
            await asyncio.sleep(0.05)
        async for piece in self.engine.astream(prompt, params, cancelled):
            yield piece

    def retire(self) -> None:
        pass


def test_over_capacity_is_refused_at_once_and_a_cancelled_client_frees_its_slot(engine):
    gated = GatedEngine(engine)

    async def scenario():
        registry = ModelRegistry()
        registry.install("m", gated)
        server = await start_gateway(registry, max_concurrency=1, max_queue=1)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = generate_pb2_grpc.GeneratorStub(channel)
            request = generate_pb2.GenerateRequest(model="m", prompt="a", max_new_tokens=5)
            held = [stub.Generate(request) for _ in range(2)]  # one generating, one queued
            await asyncio.sleep(0.5)
            started = asyncio.get_running_loop().time()
            try:
                async for _ in stub.Generate(request):
                    pass
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details()
            refused_in = asyncio.get_running_loop().time() - started
            for call in held:
                call.cancel()
            await asyncio.sleep(0.5)
            gated.gate.set()
            after = [p async for p in stub.Generate(generate_pb2.GenerateRequest(
                model="m", prompt="b", max_new_tokens=2))]
        await server.stop()
        return code, details, refused_in, after

    code, details, refused_in, after = asyncio.run(scenario())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at capacity (2 requests" in details
    assert refused_in < 1.0
    assert after[-1].finish_reason
