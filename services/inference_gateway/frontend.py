"""What every protocol shares: validation, admission, streaming, metrics.

The native Generate stream and the KServe v2 protocol are thin mappings onto
`GenerationFrontend.stream`, so the limits, the back-pressure and the numbers
on the dashboard are the same whichever client calls. Errors are typed;
each protocol maps them to its status codes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from services.inference_gateway.engines.torch import Piece, RequestError, SamplingParams
from services.inference_gateway.registry import ModelRegistry, UnknownModelError

REQUESTS = Counter("lmforge_gateway_requests_total", "Requests by model, protocol and code.",
                   ["model", "code"])
TOKENS = Counter("lmforge_gateway_generated_tokens_total", "Tokens generated.", ["model"])
IN_FLIGHT = Gauge("lmforge_gateway_in_flight", "Requests generating or waiting.")
LATENCY = Histogram("lmforge_gateway_request_seconds", "End-to-end request latency.",
                    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
TTFT = Histogram("lmforge_gateway_time_to_first_token_seconds", "Time to the first piece.",
                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))


async def _pieces(engine, prompt_ids, params, cancelled) -> AsyncIterator[Piece]:
    """An engine's pieces as an async stream: natively (continuous batching), or by
    stepping a one-request engine's generator in a worker thread."""
    if hasattr(engine, "astream"):
        async for piece in engine.astream(prompt_ids, params, cancelled):
            yield piece
        return
    pieces = engine.stream(prompt_ids, params, cancelled)
    while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
        yield piece


async def _until_stop(pieces: AsyncIterator[Piece], stops: tuple[str, ...],
                      cancelled: threading.Event) -> AsyncIterator[Piece]:
    """Cut the stream before the first stop string; hold back text that could be the
    start of one until it is decided."""
    full, sent, hold = "", 0, max(len(s) for s in stops) - 1
    async for piece in pieces:
        full += piece.text
        hits = [i for i in (full.find(s, max(0, sent - hold)) for s in stops) if i >= 0]
        if hits:
            cancelled.set()  # the engine stops at its next step
            yield Piece(full[sent:min(hits)], piece.completion_tokens, piece.prompt_tokens,
                        "stop")
            return
        if piece.finish_reason:
            yield Piece(full[sent:], piece.completion_tokens, piece.prompt_tokens,
                        piece.finish_reason)
            return
        safe = len(full) - hold
        if safe > sent:
            yield Piece(full[sent:safe], piece.completion_tokens, piece.prompt_tokens)
            sent = safe


TPOT = Histogram("lmforge_gateway_time_per_output_token_seconds",
                 "Time between tokens after the first, per request.",
                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))


class CapacityError(RuntimeError):
    """Too many requests generating or queued: refuse now rather than queue without bound."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_new_tokens: int
    max_concurrency: int
    max_queue: int
    max_prompt_chars: int


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    model: str
    prompt: str
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    seed: int = 0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    version: str = ""
    """A loaded version of the model; "" = the current one."""
    """Generation ends before the first occurrence of any of these (finish "stop")."""


class GenerationFrontend:
    def __init__(self, registry: ModelRegistry, limits: Limits) -> None:
        self.registry = registry
        self.limits = limits
        self._slots = asyncio.Semaphore(limits.max_concurrency)
        self._admitted = 0

    def sampling(self, request: GenerationRequest) -> SamplingParams:
        limits = self.limits
        if not request.prompt:
            raise RequestError("prompt is empty")
        if len(request.prompt) > limits.max_prompt_chars:
            raise RequestError(f"prompt has {len(request.prompt)} characters; the limit is "
                               f"{limits.max_prompt_chars} (LMFORGE_GATEWAY_MAX_PROMPT_CHARS)")
        max_new = request.max_new_tokens or 64
        if not 1 <= max_new <= limits.max_new_tokens:
            raise RequestError(f"max_new_tokens {request.max_new_tokens} must be in "
                               f"1..{limits.max_new_tokens}")
        if not 0 <= request.temperature <= 10:
            raise RequestError(f"temperature {request.temperature} must be in 0..10")
        if not 0 <= request.top_p <= 1:
            raise RequestError(f"top_p {request.top_p} must be in 0..1")
        if request.top_k < 0:
            raise RequestError(f"top_k {request.top_k} must be >= 0")
        if len(request.stop) > 4 or any(not s or len(s) > 256 for s in request.stop):
            raise RequestError("stop takes at most 4 non-empty strings of up to 256 characters")
        return SamplingParams(max_new_tokens=max_new, temperature=request.temperature,
                              top_p=request.top_p or 1.0, seed=request.seed,
                              top_k=request.top_k)

    async def stream(self, request: GenerationRequest, cancelled: threading.Event
                     ) -> AsyncIterator[Piece]:
        """Validate, admit, then yield pieces; raises RequestError, UnknownModelError,
        CapacityError before the first piece."""
        started = time.perf_counter()
        model = request.model
        try:
            params = self.sampling(request)
            engine = self.registry.get(model, request.version)
            prompt_ids = engine.encode_prompt(request.prompt, params.max_new_tokens)
        except RequestError:
            REQUESTS.labels(model, "INVALID_ARGUMENT").inc()
            raise
        except UnknownModelError:
            REQUESTS.labels(model, "NOT_FOUND").inc()
            raise
        waiting = self.limits.max_concurrency + self.limits.max_queue
        if self._admitted >= waiting:
            REQUESTS.labels(model, "RESOURCE_EXHAUSTED").inc()
            raise CapacityError(f"gateway is at capacity ({waiting} requests generating or "
                                "queued); retry with backoff")
        self._admitted += 1
        IN_FLIGHT.inc()
        first, first_at = True, None
        try:
            async with self._slots:
                pieces = _pieces(engine, prompt_ids, params, cancelled)
                if request.stop:
                    pieces = _until_stop(pieces, request.stop, cancelled)
                async for piece in pieces:
                    if first:
                        first_at = time.perf_counter()
                        TTFT.observe(first_at - started)
                        first = False
                    yield piece
                    if piece.finish_reason:
                        TOKENS.labels(model).inc(piece.completion_tokens)
                        if piece.completion_tokens > 1 and first_at is not None:
                            TPOT.observe((time.perf_counter() - first_at)
                                         / (piece.completion_tokens - 1))
                        break
            REQUESTS.labels(model, "OK").inc()
        except (asyncio.CancelledError, GeneratorExit):
            cancelled.set()
            REQUESTS.labels(model, "CANCELLED").inc()
            raise
        finally:
            self._admitted -= 1
            IN_FLIGHT.dec()
            LATENCY.observe(time.perf_counter() - started)
