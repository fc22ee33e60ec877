"""Continuous batching: new requests join the running batch between decoding steps,
finished ones leave, every sequence keeps its own KV cache rows.

One decoding thread owns the model. The running batch's KV cache is one tensor
per layer, [batch, heads, length, head_dim], left-padded so every row ends at
the same column; an attention mask marks the padding and explicit position ids
keep each sequence's own positions, so a row computes exactly what it would
alone. A new request is prefilled on its own (its prompt in one forward pass),
then padded into the batch; a finished or cancelled row is dropped and
all-padding columns are trimmed. Between steps the loop admits waiting
requests up to `max_batch`, so a long generation never holds the door for
short ones.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from prometheus_client import Gauge, Histogram
from transformers import DynamicCache

from services.inference_gateway.engine import GenerationEngine, Piece, SamplingParams, sample_rows

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
    generator: torch.Generator = field(init=False)
    generated: list[int] = field(default_factory=list)
    sent: str = ""
    # Incremental detokenisation: decode only the tokens since the last clean
    # character boundary, not the whole generation at every step.
    prefix_offset: int = 0
    read_offset: int = 0
    length: int = 0          # real tokens in the cache
    budget: int = 0          # new tokens still allowed
    next_token: int = -1

    def __post_init__(self) -> None:
        seed = self.params.seed or int(torch.randint(1, 2**62, (1,)).item())
        self.generator = torch.Generator().manual_seed(seed)

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
        self._waiting: queue.Queue[_Sequence] = queue.Queue()
        self._active: list[_Sequence] = []
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._mask: torch.Tensor | None = None
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
                self._reset()
            finally:
                _flush(self._outbox)

    def _reset(self) -> None:
        self._active, self._keys, self._values, self._mask = [], [], [], None

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

    @torch.inference_mode()
    def _prefill(self, group: list[_Sequence]) -> None:
        """All newly admitted prompts in one forward pass, left-padded to the longest."""
        width = max(len(s.prompt_ids) for s in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, seq in enumerate(group):
            n = len(seq.prompt_ids)
            ids[row, width - n:] = torch.tensor(seq.prompt_ids)
            mask[row, width - n:] = 1
            seq.length = n
            seq.budget = min(seq.params.max_new_tokens, self.context_length - n)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True)
        tokens = sample_rows(out.logits[:, -1], [s.params for s in group],
                             [s.generator for s in group])
        keep = [row for row, (seq, token) in enumerate(zip(group, tokens, strict=True))
                if self._finish_or_emit(seq, token)]
        if not keep:
            return
        index = torch.tensor(keep)
        keys = [layer.keys.index_select(0, index) for layer in out.cache.layers]
        values = [layer.values.index_select(0, index) for layer in out.cache.layers]
        self._join([group[i] for i in keep], keys, values, mask.index_select(0, index))

    def _join(self, group: list[_Sequence], keys: list[torch.Tensor],
              values: list[torch.Tensor], mask: torch.Tensor) -> None:
        """Append prefilled rows to the running batch, left-padding to one width."""
        if not self._active:
            self._keys, self._values, self._mask = keys, values, mask
            self._active = list(group)
            return
        cur_len, new_len = self._keys[0].shape[2], keys[0].shape[2]
        width = max(cur_len, new_len)

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, 0, width - t.shape[2], 0))

        self._keys = [torch.cat([pad(a), pad(b)]) for a, b in zip(self._keys, keys, strict=True)]
        self._values = [torch.cat([pad(a), pad(b)])
                        for a, b in zip(self._values, values, strict=True)]
        self._mask = torch.cat([torch.nn.functional.pad(self._mask, (width - cur_len, 0)),
                                torch.nn.functional.pad(mask, (width - new_len, 0))])
        self._active.extend(group)

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

    @torch.inference_mode()
    def _step(self) -> None:
        batch = len(self._active)
        BATCH_SIZE.observe(batch)
        inputs = torch.tensor([[s.next_token] for s in self._active])
        positions = torch.tensor([[s.length] for s in self._active])
        mask = torch.cat([self._mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
        cache = DynamicCache(ddp_cache_data=list(zip(self._keys, self._values, strict=True)))
        out = self.model(input_ids=inputs, attention_mask=mask, position_ids=positions,
                         cache=cache, use_cache=True)
        self._keys = [layer.keys for layer in out.cache.layers]
        self._values = [layer.values for layer in out.cache.layers]
        self._mask = mask
        tokens = sample_rows(out.logits[:, -1], [s.params for s in self._active],
                             [s.generator for s in self._active])
        keep = []
        for row, (seq, token) in enumerate(zip(self._active, tokens, strict=True)):
            seq.length += 1
            if self._finish_or_emit(seq, token):
                keep.append(row)
        if len(keep) < batch:
            self._drop(keep)

    def _drop(self, keep: list[int]) -> None:
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep)
        self._active = [self._active[i] for i in keep]
        mask = self._mask.index_select(0, index)
        first = int(mask.any(dim=0).nonzero()[0])  # trim columns that are padding everywhere
        self._mask = mask[:, first:]
        self._keys = [k.index_select(0, index)[:, :, first:] for k in self._keys]
        self._values = [v.index_select(0, index)[:, :, first:] for v in self._values]

