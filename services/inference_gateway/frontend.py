"""What every protocol shares: validation, admission, streaming, metrics.

The native Generate stream, the KServe v2 protocol and the OpenAI HTTP API are
thin mappings onto `GenerationFrontend.stream`, so the limits, the
back-pressure and the numbers on the dashboard are the same whichever client
calls. It raises only `GatewayError`s (errors.py): an engine's unexpected
exception becomes `GenerationFailed`. Each protocol runs a request inside
`counted(...)`, which counts how it ended in
`lmforge_gateway_requests_total{model,protocol,code}` — refusals, failures
during generation and cancellations included.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from services.inference_gateway.engines.base import EncodedPrompt, Engine, Piece, SamplingParams
from services.inference_gateway.errors import (
    AtCapacity,
    GatewayError,
    GenerationFailed,
    InvalidRequest,
)
from services.inference_gateway.registry import ModelRegistry

log = logging.getLogger("lmforge.gateway.frontend")

REQUESTS = Counter("lmforge_gateway_requests_total",
                   "Requests by model, protocol and how they ended (OK or a gRPC code name).",
                   ["model", "protocol", "code"])
TOKENS = Counter("lmforge_gateway_generated_tokens_total", "Tokens generated.", ["model"])
IN_FLIGHT = Gauge("lmforge_gateway_in_flight", "Requests generating or waiting.")
LATENCY = Histogram("lmforge_gateway_request_seconds", "End-to-end request latency.",
                    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
TTFT = Histogram("lmforge_gateway_time_to_first_token_seconds", "Time to the first piece.",
                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))
TPOT = Histogram("lmforge_gateway_time_per_output_token_seconds",
                 "Time between tokens after the first, per request.",
                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))


@dataclass(slots=True)
class Outcome:
    """Labels of one request's count; a protocol sets `model` once it has parsed it."""

    protocol: str
    model: str = ""


@contextmanager
def counted(protocol: str, model: str = "") -> Iterator[Outcome]:
    """Count the request that runs inside once, by how it ends: OK, the code of the
    GatewayError that ends it, CANCELLED when the client goes away (a cancelled task,
    a closed generator, a reset connection), INTERNAL otherwise."""
    outcome = Outcome(protocol, model)
    code = "INTERNAL"
    try:
        yield outcome
        code = "OK"
    except GatewayError as exc:
        code = exc.code
        raise
    except (asyncio.CancelledError, GeneratorExit, ConnectionResetError):
        code = "CANCELLED"
        raise
    finally:
        # A client's model name with a lone surrogate would break the /metrics text.
        model = outcome.model.encode("utf-8", "backslashreplace").decode("utf-8")
        REQUESTS.labels(model, outcome.protocol, code).inc()


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


async def _engine_pieces(engine: Engine, prompt: EncodedPrompt, params: SamplingParams,
                         cancelled: threading.Event) -> AsyncIterator[Piece]:
    """The engine's stream, failing only with GatewayErrors."""
    try:
        async for piece in engine.astream(prompt, params, cancelled):
            yield piece
    except GatewayError:
        raise
    except Exception as exc:
        log.exception("generation failed on engine version %s", engine.version)
        raise GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}") from exc


MAX_SEED = 2**64 - 1
"""Seeds are 64-bit (uint64 in the native and KServe messages)."""
MAX_TOP_K = 2**31 - 1
"""top_k is an int32 in the native and KServe messages."""


def _check_text(field: str, text: str) -> None:
    """Text must be encodable as UTF-8: JSON can carry a lone surrogate ("\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            f"{field} is not valid Unicode: a lone surrogate U+{ord(text[exc.start]):04X} at "
            f"character {exc.start} (send a character outside the BMP as one code point, "
            "or as a surrogate pair)") from None


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
    """Generation ends before the first occurrence of any of these (finish "stop")."""
    version: str = ""
    """A loaded version of the model; "" = the current one."""


class GenerationFrontend:
    def __init__(self, registry: ModelRegistry, limits: Limits) -> None:
        self.registry = registry
        self.limits = limits
        self._slots = asyncio.Semaphore(limits.max_concurrency)
        self._admitted = 0

    def sampling(self, request: GenerationRequest) -> SamplingParams:
        """The request's sampling parameters; raises InvalidRequest for any field out of
        range (the same ranges over every protocol: those of the native message's types)."""
        limits = self.limits
        if not request.prompt:
            raise InvalidRequest("prompt is empty")
        if len(request.prompt) > limits.max_prompt_chars:
            raise InvalidRequest(f"prompt has {len(request.prompt)} characters; the limit is "
                                 f"{limits.max_prompt_chars} (LMFORGE_GATEWAY_MAX_PROMPT_CHARS)")
        _check_text("prompt", request.prompt)
        max_new = request.max_new_tokens or 64
        if not 1 <= max_new <= limits.max_new_tokens:
            raise InvalidRequest(f"max_new_tokens {request.max_new_tokens} must be in "
                                 f"1..{limits.max_new_tokens}")
        if not 0 <= request.temperature <= 10:  # NaN fails every comparison
            raise InvalidRequest(f"temperature {request.temperature} must be in 0..10")
        if not 0 <= request.top_p <= 1:
            raise InvalidRequest(f"top_p {request.top_p} must be in 0..1")
        if not 0 <= request.top_k <= MAX_TOP_K:
            raise InvalidRequest(f"top_k {request.top_k} must be in 0..{MAX_TOP_K}")
        if not 0 <= request.seed <= MAX_SEED:
            raise InvalidRequest(f"seed {request.seed} must be in 0..{MAX_SEED} (64 bits)")
        if len(request.stop) > 4 or any(not s or len(s) > 256 for s in request.stop):
            raise InvalidRequest("stop takes at most 4 non-empty strings of up to 256 "
                                 "characters")
        for stop in request.stop:
            _check_text("stop", stop)
        return SamplingParams(max_new_tokens=max_new, temperature=request.temperature,
                              top_p=request.top_p or 1.0, seed=request.seed,
                              top_k=request.top_k)

    async def stream(self, request: GenerationRequest, cancelled: threading.Event
                     ) -> AsyncGenerator[Piece, None]:
        """Validate, admit, then yield pieces. Raises InvalidRequest, UnknownModel or
        AtCapacity before the first piece; the engine's errors (EngineUnavailable,
        UpstreamFailed, GenerationFailed, ...) before or after it."""
        started = time.perf_counter()
        model = request.model
        params = self.sampling(request)
        engine = self.registry.get(model, request.version)
        prompt = engine.encode_prompt(request.prompt)
        waiting = self.limits.max_concurrency + self.limits.max_queue
        if self._admitted >= waiting:
            raise AtCapacity(f"gateway is at capacity ({waiting} requests generating or "
                             "queued); retry with backoff")
        self._admitted += 1
        IN_FLIGHT.inc()
        first_at: float | None = None
        try:
            async with self._slots:
                pieces = _engine_pieces(engine, prompt, params, cancelled)
                if request.stop:
                    pieces = _until_stop(pieces, request.stop, cancelled)
                async for piece in pieces:
                    if first_at is None:
                        first_at = time.perf_counter()
                        TTFT.observe(first_at - started)
                    yield piece
                    if piece.finish_reason:
                        TOKENS.labels(model).inc(piece.completion_tokens)
                        if piece.completion_tokens > 1:
                            TPOT.observe((time.perf_counter() - first_at)
                                         / (piece.completion_tokens - 1))
                        break
        except (asyncio.CancelledError, GeneratorExit):
            cancelled.set()
            raise
        finally:
            self._admitted -= 1
            IN_FLIGHT.dec()
            LATENCY.observe(time.perf_counter() - started)
