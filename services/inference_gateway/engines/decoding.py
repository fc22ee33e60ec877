"""From sampled tokens to pieces of text: one way for every local engine.

`Generation` is one request's decoding state (token budget, random stream,
text released so far); the single-request PyTorch engine, the ONNX engine and
the batching loop all feed it the token they sampled and send what it returns,
so a generation ends, counts and reads the same on each. `generate` is the
loop of the two single-sequence engines, which differ only in how they compute
the next token's logits.

Detokenisation is incremental. Decoding the whole output at every token costs
O(output) per token, O(n²) per request; `IncrementalDetokenizer` decodes a
window of a few tokens instead. Byte-level BPE can end a token inside a
multi-byte UTF-8 character (CJK, emoji): a window that decodes to a trailing
U+FFFD is held back until the character's last byte arrives, so clients never
see a broken character, and the pieces add up to the full decode.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from services.inference_gateway.engines.base import EncodedPrompt, Piece, SamplingParams
from services.inference_gateway.engines.sampling import request_rng, sample_next
from services.inference_gateway.errors import InvalidRequest

REPLACEMENT = "\ufffd"


class Tokenizer(Protocol):
    """The two calls of a Hugging Face tokenizer that serving needs."""

    def encode(self, text: str, *, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = ...
               ) -> str | list[str]: ...


def encode_prompt(tokenizer: Tokenizer, context_length: int, prompt: str) -> EncodedPrompt:
    """The prompt's token ids, refused when empty or when it leaves no room to generate."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if not ids:
        raise InvalidRequest("prompt encodes to no tokens")
    if len(ids) >= context_length:
        raise InvalidRequest(
            f"prompt of {len(ids)} tokens exceeds the model's context of "
            f"{context_length} tokens (leave room for at least one new token)"
        )
    return EncodedPrompt(prompt, tuple(ids))


class IncrementalDetokenizer:
    """The text of a growing token sequence, released as soon as it is stable.

    Each step decodes only a window: the tokens not yet released, after the tokens
    of the last release (kept as context, so a tokenizer that drops a leading space
    at the start of a decode sees the same text as a full decode). What the window
    adds beyond its context is released unless it ends in U+FFFD (an incomplete
    character). A step costs O(window), a few tokens, however long the output.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._prefix_offset = 0  # the window starts here: the last release's tokens
        self._read_offset = 0  # tokens from here on are not released yet
        self._prefix_text = ""  # decode(tokens[prefix_offset:read_offset])

    def _decode(self, start: int, stop: int | None = None) -> str:
        text = self.tokenizer.decode(self.tokens[start:stop], skip_special_tokens=True)
        if not isinstance(text, str):  # only a batch of sequences decodes to a list
            raise TypeError(f"decoding one sequence gave a {type(text).__name__}")
        return text

    def add(self, token: int) -> str:
        """Append `token`; returns the text that became stable ("" while none did)."""
        self.tokens.append(token)
        text = self._decode(self._prefix_offset)
        if len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT):
            return ""
        released = text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.tokens)
        self._prefix_text = self._decode(self._prefix_offset)
        return released

    def flush(self) -> str:
        """The text not released yet, whatever it ends with: the end of the output."""
        rest = self._decode(self._prefix_offset)[len(self._prefix_text):]
        self._prefix_offset = self._read_offset = len(self.tokens)
        self._prefix_text = ""
        return rest


class Generation:
    """One request's decoding: its token budget, its random stream, its released text."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, *, prompt_tokens: int,
                 eos_token_id: int, context_length: int) -> None:
        self.params = params
        self.rng = request_rng(params.seed)
        self.prompt_tokens = prompt_tokens
        # Generation stops at the context length ("length"), whatever was asked.
        self.budget = min(params.max_new_tokens, context_length - prompt_tokens)
        self.eos_token_id = eos_token_id
        self.completion_tokens = 0
        self.finish_reason = ""
        self._text = IncrementalDetokenizer(tokenizer)

    def add(self, token: int) -> Piece | None:
        """Take the next sampled token; returns the piece to send (the last one carries
        a finish reason), or None while no new text is stable."""
        if token == self.eos_token_id:
            return self.finish("eos")
        self.completion_tokens += 1
        text = self._text.add(token)
        if self.completion_tokens >= self.budget:
            return self.finish("length", text)
        return Piece(text, self.completion_tokens, self.prompt_tokens) if text else None

    def finish(self, reason: str, text: str = "") -> Piece:
        """The last piece: `text` and whatever is still held back, with `reason`."""
        self.finish_reason = reason
        return Piece(text + self._text.flush(), self.completion_tokens, self.prompt_tokens,
                     reason)


def generate(next_logits: Callable[[int | None], torch.Tensor], generation: Generation,
             cancelled: threading.Event | None = None) -> Iterator[Piece]:
    """The decoding loop of one sequence: `next_logits(token)` takes the last sampled
    token (None at first: the prompt) and returns the next token's logits [vocab]."""
    token: int | None = None
    while True:
        if cancelled is not None and cancelled.is_set():
            yield generation.finish("cancelled")
            return
        token = sample_next(next_logits(token), generation.params, generation.rng)
        piece = generation.add(token)
        if piece is not None:
            yield piece
            if piece.finish_reason:
                return
