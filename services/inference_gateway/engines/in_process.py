"""What the engines that generate in the gateway's own process share.

The single-request PyTorch engine and the ONNX engine differ only in how they
compute the next token's logits; the prompt encoding, the decode loop (sampling,
stop conditions, incremental detokenising), the async stream over worker threads
and the nothing-to-free life cycle are this base class's.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import torch

from services.inference_gateway.engines.base import (
    EncodedPrompt,
    Piece,
    SamplingParams,
    in_worker_thread,
)
from services.inference_gateway.engines.decoding import Generation, encode_prompt, generate


class InProcessEngine:
    """Subclasses set `tokenizer`, `eos_token_id`, `context_length` and `version`, and
    implement `next_logits_fn`."""

    tokenizer: Any
    eos_token_id: int
    context_length: int
    version: str

    def encode_prompt(self, prompt: str) -> EncodedPrompt:
        return encode_prompt(self.tokenizer, self.context_length, prompt)

    def next_logits_fn(self, prompt: EncodedPrompt) -> Callable[[int | None], torch.Tensor]:
        """A function that takes the last sampled token (None first) and returns the
        logits of the next one, keeping whatever state the backend needs."""
        raise NotImplementedError

    def stream(self, prompt: EncodedPrompt, params: SamplingParams,
               cancelled: threading.Event | None = None) -> Iterator[Piece]:
        """The generation as a synchronous generator (stepped from any thread)."""
        generation = Generation(self.tokenizer, params, prompt_tokens=len(prompt.token_ids),
                                eos_token_id=self.eos_token_id,
                                context_length=self.context_length)
        return generate(self.next_logits_fn(prompt), generation, cancelled)

    async def astream(self, prompt: EncodedPrompt, params: SamplingParams,
                      cancelled: threading.Event) -> AsyncIterator[Piece]:
        async for piece in in_worker_thread(self.stream(prompt, params, cancelled)):
            yield piece

    def retire(self) -> None:
        """Nothing to free early: the weights go when the last request lets go of them."""

    def close(self) -> None:
        """Nothing of its own to stop: it lives in the gateway's process."""
