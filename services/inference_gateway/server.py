"""The gRPC server: lmforge.v1.Generator, grpc.health.v1 and server reflection.

Requests are validated before any work (bad ones get INVALID_ARGUMENT or
NOT_FOUND with a message that says what was wrong); at most
`max_concurrency` generate at once and `max_queue` more may wait, beyond that
the answer is RESOURCE_EXHAUSTED at once instead of an unbounded queue.
`grpc.server.max_pending_requests` is raised above our own bound so grpc.aio
never cancels bursts on its own. Each request runs under its deadline: when
the client goes away or the deadline passes, generation stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Gauge, Histogram

from lmforge.contracts.v1 import generate_pb2, generate_pb2_grpc
from services.inference_gateway.engine import RequestError, SamplingParams
from services.inference_gateway.registry import ModelRegistry, UnknownModelError

GENERATOR_SERVICE = generate_pb2.DESCRIPTOR.services_by_name["Generator"].full_name

REQUESTS = Counter("lmforge_gateway_requests_total", "Generate requests by model and code.",
                   ["model", "code"])
TOKENS = Counter("lmforge_gateway_generated_tokens_total", "Tokens generated.", ["model"])
IN_FLIGHT = Gauge("lmforge_gateway_in_flight", "Requests generating or waiting.")
LATENCY = Histogram("lmforge_gateway_request_seconds", "End-to-end Generate latency.",
                    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
TTFT = Histogram("lmforge_gateway_time_to_first_token_seconds", "Time to the first piece.",
                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))


class GeneratorServicer(generate_pb2_grpc.GeneratorServicer):
    def __init__(self, registry: ModelRegistry, *, max_new_tokens: int, max_concurrency: int,
                 max_queue: int, max_prompt_chars: int) -> None:
        self.registry = registry
        self.max_new_tokens = max_new_tokens
        self.max_prompt_chars = max_prompt_chars
        self.max_waiting = max_concurrency + max_queue
        self._slots = asyncio.Semaphore(max_concurrency)
        self._admitted = 0

    def _validate(self, request: generate_pb2.GenerateRequest) -> SamplingParams:
        if not request.prompt:
            raise RequestError("prompt is empty")
        if len(request.prompt) > self.max_prompt_chars:
            raise RequestError(f"prompt has {len(request.prompt)} characters; the limit is "
                               f"{self.max_prompt_chars} (LMFORGE_GATEWAY_MAX_PROMPT_CHARS)")
        max_new = request.max_new_tokens or 64
        if not 1 <= max_new <= self.max_new_tokens:
            raise RequestError(f"max_new_tokens {request.max_new_tokens} must be in "
                               f"1..{self.max_new_tokens}")
        if not 0 <= request.temperature <= 10:
            raise RequestError(f"temperature {request.temperature} must be in 0..10")
        if not 0 <= request.top_p <= 1:
            raise RequestError(f"top_p {request.top_p} must be in 0..1")
        return SamplingParams(max_new_tokens=max_new, temperature=request.temperature,
                              top_p=request.top_p or 1.0, seed=request.seed)

    async def Generate(self, request, context: grpc.aio.ServicerContext):
        started = time.perf_counter()
        model = request.model
        try:
            params = self._validate(request)
            engine = self.registry.get(model)
            prompt_ids = engine.encode_prompt(request.prompt, params.max_new_tokens)
        except RequestError as exc:
            REQUESTS.labels(model, "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except UnknownModelError as exc:
            REQUESTS.labels(model, "NOT_FOUND").inc()
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        if self._admitted >= self.max_waiting:
            REQUESTS.labels(model, "RESOURCE_EXHAUSTED").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"gateway is at capacity ({self.max_waiting} requests "
                                "generating or queued); retry with backoff")
        self._admitted += 1
        IN_FLIGHT.inc()
        cancelled = threading.Event()
        context.add_done_callback(lambda _ctx: cancelled.set())
        first = True
        try:
            async with self._slots:
                stream = engine.stream(prompt_ids, params, cancelled)
                while True:
                    piece = await asyncio.to_thread(next, stream, None)
                    if piece is None:
                        break
                    if first:
                        TTFT.observe(time.perf_counter() - started)
                        first = False
                    yield generate_pb2.GenerateResponse(
                        text=piece.text, finish_reason=piece.finish_reason,
                        completion_tokens=piece.completion_tokens,
                        prompt_tokens=piece.prompt_tokens)
                    if piece.finish_reason:
                        TOKENS.labels(model).inc(piece.completion_tokens)
                        break
            REQUESTS.labels(model, "OK").inc()
        except asyncio.CancelledError:
            cancelled.set()
            REQUESTS.labels(model, "CANCELLED").inc()
            raise
        finally:
            self._admitted -= 1
            IN_FLIGHT.dec()
            LATENCY.observe(time.perf_counter() - started)


class GatewayServer:
    """grpc.aio server with the Generator, health and reflection services."""

    def __init__(self, servicer: GeneratorServicer, *, host: str, port: int,
                 max_message_bytes: int) -> None:
        self.servicer = servicer
        self.server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 1),  # replicas of the gateway share the port
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.server.max_pending_requests", 100_000),
        ])
        generate_pb2_grpc.add_GeneratorServicer_to_server(servicer, self.server)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else \
            health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (GENERATOR_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind the gateway to {host}:{port}")
        self.host = host

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", GENERATOR_SERVICE):
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def start(self) -> None:
        await self.set_serving(False)
        await self.server.start()

    async def stop(self, grace_s: float = 5.0) -> None:
        with contextlib.suppress(Exception):
            await self.set_serving(False)
        await self.server.stop(grace_s)
