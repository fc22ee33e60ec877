"""Continuous batching: new requests join the running batch between decoding steps,
finished ones leave, every sequence keeps its own KV cache rows.

`BatchingLoop` is the engine's single thread and knows nothing of transports:
between steps it calls `receive(timeout)` (which calls `submit` / `cancel` for
whatever arrived, waiting up to `timeout` when there is nothing to decode), and
hands each step's pieces to `deliver`. It runs inside the engine process
(process.py), which connects both to the gateway's pipes; one thread means no
hand-off between a receiving thread and the decoding one. Each sequence's
sampled tokens go through its `Generation` (decoding.py), as in the
single-request engines: the same budget, finish reasons and incremental text.

The running batch lives in a `SlotDecoder`: one preallocated cache row per
sequence, each at its own length, so a joining request is prefilled (all newly
admitted prompts in one forward pass) straight into free rows and a finished or
cancelled one gives its row back — nothing is re-padded or shifted. Between
steps the loop admits waiting requests up to `max_batch`, so a long generation
never holds the door for short ones.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from services.inference_gateway.engines.base import Piece, SamplingParams
from services.inference_gateway.engines.decoding import Generation, Tokenizer
from services.inference_gateway.engines.sampling import sample_rows
from services.inference_gateway.engines.slot_decoder import SlotDecoder

log = logging.getLogger("lmforge.gateway.batching")

Delivery = Callable[[list[tuple[int, "Piece | str"]], list[int], int], None]
"""Receives a step's output — (sequence id, piece) or (sequence id, error message) —
with the batch sizes of the steps since the last call and the queue's length."""


@dataclass
class Sequence:
    id: int
    prompt_ids: list[int]
    generation: Generation
    cancelled: bool = False  # set by `cancel`; read between steps
    next_token: int = -1


class BatchingLoop:
    """Continuous batching over a model and its tokenizer."""

    def __init__(self, model: PreTrainedModel, tokenizer: Tokenizer, *, max_batch: int,
                 deliver: Delivery, receive: Callable[[float], None]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_id: int = model.config.eos_token_id
        self.context_length: int = model.config.max_position_embeddings
        self.max_batch = max_batch
        self.deliver = deliver
        self.receive = receive
        self.decoder = SlotDecoder(model, max_rows=max_batch)
        self._waiting: deque[Sequence] = deque()
        self._by_id: dict[int, Sequence] = {}
        self._active: list[Sequence] = []  # row i of the decoder is _active[i]
        self._outbox: list[tuple[int, Piece | str]] = []
        self._step_sizes: list[int] = []

    def submit(self, seq_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; it joins the batch at the next step with a free row."""
        seq = Sequence(seq_id, prompt_ids, Generation(
            self.tokenizer, params, prompt_tokens=len(prompt_ids),
            eos_token_id=self.eos_token_id, context_length=self.context_length))
        self._by_id[seq.id] = seq
        self._waiting.append(seq)

    def cancel(self, seq_id: int) -> None:
        """The client went away: the sequence leaves the batch at the next step."""
        seq = self._by_id.get(seq_id)
        if seq is not None:
            seq.cancelled = True

    def run(self, stop: threading.Event, retiring: threading.Event) -> None:
        """Decode until `stop`, or until `retiring` and nothing is left to do."""
        while not stop.is_set():
            if retiring.is_set() and not self._active and not self._waiting:
                return
            try:
                self._admit(block=not self._active)
                if self._active:
                    self._step()
            except Exception as exc:  # fail the requests in hand, keep serving
                log.exception("decoding step failed")
                for seq in self._active:
                    self._emit(seq, f"generation failed: {exc}")
                self._active = []
                self.decoder = SlotDecoder(self.model, max_rows=self.max_batch)
            finally:
                if self._outbox:
                    items, sizes = self._outbox, self._step_sizes
                    self._outbox, self._step_sizes = [], []
                    self.deliver(items, sizes, len(self._waiting))

    def _emit(self, seq: Sequence, piece: Piece | str) -> None:
        self._outbox.append((seq.id, piece))
        if isinstance(piece, str) or piece.finish_reason:
            self._by_id.pop(seq.id, None)

    def _admit(self, *, block: bool) -> None:
        self.receive(0.05 if block else 0.0)
        admitted: list[Sequence] = []
        while self._waiting and len(self._active) + len(admitted) < self.max_batch:
            seq = self._waiting.popleft()
            if seq.cancelled:
                self._by_id.pop(seq.id, None)
            else:
                admitted.append(seq)
        if admitted:
            self._prefill(admitted)

    def _prefill(self, group: list[Sequence]) -> None:
        """All newly admitted prompts in one forward pass, into rows after the running ones."""
        logits = self.decoder.prefill([s.prompt_ids for s in group])
        self._active.extend(group)
        self._advance(logits, first=len(self._active) - len(group))

    def _step(self) -> None:
        self._step_sizes.append(len(self._active))
        logits = self.decoder.decode([s.next_token for s in self._active])
        self._advance(logits, first=0)

    def _advance(self, logits: torch.Tensor, *, first: int) -> None:
        """Sample the next token of rows first.. from `logits`; free the rows that finish."""
        rows = self._active[first:]
        tokens = sample_rows(logits, [s.generation.params for s in rows],
                             [s.generation.rng for s in rows])
        done = [first + i for i, (seq, token) in enumerate(zip(rows, tokens, strict=True))
                if not self._finish_or_emit(seq, token)]
        for row in reversed(done):  # highest first: the row moved into a gap is a keeper
            moved = self.decoder.release(row)
            self._active[row] = self._active[moved]
            self._active.pop()

    def _finish_or_emit(self, seq: Sequence, token: int) -> bool:
        """Record `token` for `seq`; emit text; return False when the sequence is done."""
        if seq.cancelled:
            self._by_id.pop(seq.id, None)
            return False
        piece = seq.generation.add(token)
        seq.next_token = token
        if piece is not None:
            self._emit(seq, piece)
        return not seq.generation.finish_reason
