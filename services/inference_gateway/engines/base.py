"""What every engine is to the rest of the gateway: the `Engine` protocol and its types.

An engine is one loaded model version. The frontend asks it to encode a prompt
(before admission, so a bad prompt is refused before it costs anything), then
streams `Piece`s of text from it. Engines raise only `GatewayError`s
(errors.py) for what a client should hear about; the frontend turns anything
else into `GenerationFailed`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Protocol

from services.inference_gateway.engines.int4_report import Int4Report


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    top_k: int = 0


@dataclass(frozen=True, slots=True)
class Piece:
    """New text of one request, with the token counts so far; the last one has a
    `finish_reason` (eos, length, stop, cancelled)."""

    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str = ""


@dataclass(frozen=True, slots=True)
class EncodedPrompt:
    """A prompt as the engine takes it: its text, and its token ids where the engine
    tokenizes here (a remote engine leaves them empty: the remote side tokenizes)."""

    text: str
    token_ids: tuple[int, ...] = ()


class Engine(Protocol):
    """One loaded model version behind the frontend."""

    version: str
    int4_report: Int4Report | None
    """For a packed int4 model, which layers the load served dequantised and why."""

    def encode_prompt(self, prompt: str) -> EncodedPrompt:
        """The prompt ready to generate from; raises InvalidRequest saying what is wrong."""
        ...

    def astream(self, prompt: EncodedPrompt, params: SamplingParams,
                cancelled: threading.Event) -> AsyncIterator[Piece]:
        """The generation's pieces, the last with a finish reason. `cancelled` set: stop
        at the next token."""
        ...

    def retire(self) -> None:
        """A newer version replaced this one: free what it holds once its requests finish."""
        ...

    def close(self) -> None:
        """The gateway is stopping: free everything now (a child process is stopped and
        reaped, never restarted)."""
        ...


def default_threads() -> int:
    """Compute threads for a serving process: all usable cores but one, which is left to
    the event loop (gRPC, HTTP, detokenised pieces). With OMP_WAIT_POLICY=PASSIVE a second
    thread also costs a wake-up per small matmul: on 2 cores one thread decodes the
    demo model 2.5x faster than two."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


async def in_worker_thread(pieces: Iterator[Piece]) -> AsyncIterator[Piece]:
    """A synchronous engine's generator as an async stream, each step in a worker thread
    (so the event loop serves other requests while it computes)."""
    while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
        yield piece
