"""Continuous batching: new requests join the running batch between decoding steps,
finished ones leave, every sequence keeps its own KV cache rows.

One decoding thread owns the model. The running batch lives in a `SlotDecoder`:
one preallocated cache row per sequence, each at its own length, so a joining
request is prefilled (all newly admitted prompts in one forward pass) straight
into free rows and a finished or cancelled one gives its row back — nothing is
re-padded or shifted. Between steps the loop admits waiting requests up to
`max_batch`, so a long generation never holds the door for short ones.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from prometheus_client import Gauge, Histogram

from services.inference_gateway.engine import (
    GenerationEngine,
    Piece,
    SamplingParams,
    request_rng,
    sample_rows,
)
from services.inference_gateway.slot_decoder import SlotDecoder

log = logging.getLogger("lmforge.gateway.batching")

BATCH_SIZE = Histogram("lmforge_gateway_batch_size", "Sequences per decoding step.",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
QUEUE_DEPTH = Gauge("lmforge_gateway_queue_depth", "Requests waiting to join the batch.")


@dataclass
class _Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    cancelled: threading.Event
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    outbox: list  # the engine's: pieces of the current step, flushed after it
    rng: random.Random = field(init=False)
    generated: list[int] = field(default_factory=list)
    sent: str = ""
    # Incremental detokenisation: decode only the tokens since the last clean
    # character boundary, not the whole generation at every step.
    prefix_offset: int = 0
    read_offset: int = 0
    budget: int = 0          # new tokens still allowed
    next_token: int = -1

    def __post_init__(self) -> None:
        self.rng = request_rng(self.params.seed)

    def emit(self, piece: Piece | BaseException) -> None:
        self.outbox.append((self, piece))


def _deliver(items: list[tuple[_Sequence, Piece | BaseException]]) -> None:
    for seq, piece in items:
        seq.out.put_nowait(piece)


def _flush(outbox: list) -> None:
    """Hand a step's pieces to the event loop(s) in one call each: one cross-thread
    wake-up per step instead of one per sequence."""
    if not outbox:
        return
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for seq, piece in outbox:
        by_loop.setdefault(seq.loop, []).append((seq, piece))
    outbox.clear()
    for loop, items in by_loop.items():
        loop.call_soon_threadsafe(_deliver, items)


class BatchingEngine:
    """Continuous batching over a loaded `GenerationEngine`'s model and tokenizer."""

    def __init__(self, base: GenerationEngine, *, max_batch: int = 32) -> None:
        self.base = base
        self.version = base.version
        self.model = base.model
        self.tokenizer = base.tokenizer
        self.eos_token_id = base.eos_token_id
        self.context_length = base.context_length
        self.max_batch = max_batch
        self.decoder = SlotDecoder(base.model, max_rows=max_batch)
        self._waiting: queue.Queue[_Sequence] = queue.Queue()
        self._active: list[_Sequence] = []  # row i of the decoder is _active[i]
        self._outbox: list = []
        self._stop = threading.Event()
        self._retiring = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batching", daemon=True)
        self._thread.start()

    def encode_prompt(self, prompt: str, max_new_tokens: int) -> list[int]:
        return self.base.encode_prompt(prompt, max_new_tokens)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def retire(self) -> None:
        """Finish what is running and queued, then stop the decoding thread."""
        self._retiring.set()

    async def astream(self, prompt_ids: list[int], params: SamplingParams,
                      cancelled: threading.Event) -> AsyncIterator[Piece]:
        seq = _Sequence(prompt_ids, params, cancelled, asyncio.get_running_loop(),
                        asyncio.Queue(), self._outbox)
        self._waiting.put(seq)
        QUEUE_DEPTH.set(self._waiting.qsize())
        try:
            while True:
                item = await seq.out.get()
                # When the client side falls behind, pieces queue up: send them as one
                # (fewer messages is what lets the loop catch up).
                while not isinstance(item, BaseException) and not item.finish_reason:
                    try:
                        following = seq.out.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                    if isinstance(following, BaseException):
                        item = following
                        break
                    item = Piece(item.text + following.text, following.completion_tokens,
                                 following.prompt_tokens, following.finish_reason)
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            cancelled.set()  # a client that went away frees its row at the next step

    # -- the decoding thread ---------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._retiring.is_set() and not self._active and self._waiting.empty():
                return
            try:
                self._admit(block=not self._active)
                if self._active:
                    self._step()
            except Exception as exc:  # fail the requests in hand, keep serving
                log.exception("decoding step failed")
                for seq in self._active:
                    seq.emit(RuntimeError(f"generation failed: {exc}"))
                self._active = []
                self.decoder = SlotDecoder(self.model, max_rows=self.max_batch)
            finally:
                _flush(self._outbox)

    def _admit(self, *, block: bool) -> None:
        admitted: list[_Sequence] = []
        while len(self._active) + len(admitted) < self.max_batch:
            try:
                seq = self._waiting.get(timeout=0.05) if block else self._waiting.get_nowait()
            except queue.Empty:
                break
            block = False
            if not seq.cancelled.is_set():
                admitted.append(seq)
        QUEUE_DEPTH.set(self._waiting.qsize())
        if admitted:
            self._prefill(admitted)

    def _prefill(self, group: list[_Sequence]) -> None:
        """All newly admitted prompts in one forward pass, into rows after the running ones."""
        for seq in group:
            seq.budget = min(seq.params.max_new_tokens,
                             self.context_length - len(seq.prompt_ids))
        logits = self.decoder.prefill([s.prompt_ids for s in group])
        self._active.extend(group)
        self._advance(logits, first=len(self._active) - len(group))

    def _step(self) -> None:
        BATCH_SIZE.observe(len(self._active))
        logits = self.decoder.decode([s.next_token for s in self._active])
        self._advance(logits, first=0)

    def _advance(self, logits: torch.Tensor, *, first: int) -> None:
        """Sample the next token of rows first.. from `logits`; free the rows that finish."""
        rows = self._active[first:]
        tokens = sample_rows(logits, [s.params for s in rows], [s.rng for s in rows])
        done = [first + i for i, (seq, token) in enumerate(zip(rows, tokens, strict=True))
                if not self._finish_or_emit(seq, token)]
        for row in reversed(done):  # highest first: the row moved into a gap is a keeper
            moved = self.decoder.release(row)
            self._active[row] = self._active[moved]
            self._active.pop()

    def _finish_or_emit(self, seq: _Sequence, token: int) -> bool:
        """Record `token` for `seq`; emit text; return False when the sequence is done."""
        if seq.cancelled.is_set():
            return False
        if token == self.eos_token_id:
            self._final(seq, "eos")
            return False
        seq.generated.append(token)
        seq.budget -= 1
        seq.next_token = token
        if seq.budget <= 0:
            self._final(seq, "length")
            return False
        decode = self.tokenizer.decode
        before = decode(seq.generated[seq.prefix_offset:seq.read_offset],
                        skip_special_tokens=True)
        now = decode(seq.generated[seq.prefix_offset:], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            delta = now[len(before):]
            seq.emit(Piece(delta, len(seq.generated), len(seq.prompt_ids)))
            seq.sent += delta
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.generated)
        return True

    def _final(self, seq: _Sequence, reason: str) -> None:
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        seq.emit(Piece(text[len(seq.sent):], len(seq.generated), len(seq.prompt_ids), reason))
