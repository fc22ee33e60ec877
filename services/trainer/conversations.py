"""Chat data in the trainer: sequences of whole conversations, and a loss on the
assistant's tokens only.

Data-prep stores a chat dataset as the token stream of rendered conversations,
each followed by a separator, with a parallel loss mask (1 = an assistant's
token) and the document index (services/data_prep/chat.py, packing.py). A
window cut anywhere in the stream, as plain text is sampled, would start
mid-conversation, with answers whose questions were cut off; so chat
micro-batches are built from whole conversations (a conversation longer than
the sequence keeps its first `seq_len` tokens), in one of two layouts:

- **packed**: conversations are laid end to end in a row until the next one does
  not fit; the rest of the row is padding. Every conversation's position ids
  start again at 0, and the model is called with those position ids and no
  attention mask: transformers (5.x, `masking_utils.find_packed_sequence_indices`)
  then builds a block-diagonal causal mask from the position resets, so no token
  attends to another conversation (test_chat_training pins that the logits of a
  packed conversation equal those of the same conversation alone). The first
  token of each conversation is never a target, so no loss crosses a boundary.
- **unpacked**: one conversation per row, padded; a plain causal mask.

The padding is never a target. Which is faster: benchmarks/finetune.py measures
trained tokens/s of both (packed wins in proportion to the padding it saves).

Draws come only from the generator the training loop seeds with (seed, step,
micro-batch, rank), so exact resume holds as it does for text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

IGNORE_INDEX = -100
"""The label transformers' causal-LM loss skips."""


@dataclass(frozen=True, slots=True)
class LabelledBatch:
    """A micro-batch whose loss covers chosen tokens only."""

    input_ids: torch.Tensor
    """int64 [rows, seq_len]."""
    labels: torch.Tensor
    """int64 [rows, seq_len]: the token where it is trained, IGNORE_INDEX elsewhere."""
    position_ids: torch.Tensor | None
    """int64 [rows, seq_len] restarting at 0 for each packed conversation; None: 0..T-1."""

    def numel(self) -> int:
        return self.input_ids.numel()

    def model_inputs(self, device: torch.device) -> dict[str, torch.Tensor | bool]:
        """The forward's keyword arguments. No cache: transformers derives the packed
        mask from the position ids only when there is none."""
        inputs: dict[str, torch.Tensor | bool] = {
            "input_ids": self.input_ids.to(device, non_blocking=True),
            "labels": self.labels.to(device, non_blocking=True), "use_cache": False}
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids.to(device, non_blocking=True)
        return inputs


Batch = torch.Tensor | LabelledBatch
"""What an engine trains on: a token tensor (plain text: every token is a target) or a
labelled batch (chat)."""


def model_inputs(batch: Batch, device: torch.device) -> dict[str, torch.Tensor | bool]:
    if isinstance(batch, LabelledBatch):
        return batch.model_inputs(device)
    x = batch.to(device, non_blocking=True)
    return {"input_ids": x, "labels": x}


class ConversationRows:
    """Micro-batches of whole conversations drawn by their weights, packed or not."""

    def __init__(self, offsets: np.ndarray, weights: np.ndarray, loss_mask: np.ndarray,
                 *, seq_len: int, packed: bool, pad_token_id: int) -> None:
        if len(offsets) < 2:
            raise ValueError("a chat dataset without conversations")
        if len(loss_mask) != offsets[-1]:
            raise ValueError(f"loss mask of {len(loss_mask)} for {offsets[-1]} tokens")
        self.seq_len = seq_len
        self.packed = packed
        self.pad_token_id = pad_token_id
        self._starts = offsets[:-1]
        self._lengths = np.minimum(np.diff(offsets), seq_len)
        self._cumulative = np.cumsum(weights.astype(np.float64))
        self._mean_length = float((weights * self._lengths).sum() / weights.sum())
        self._mask = loss_mask

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        u = rng.random(n)
        docs = np.searchsorted(self._cumulative, u * self._cumulative[-1], side="right")
        return np.minimum(docs, len(self._starts) - 1)

    def batch(self, tokens: np.ndarray, rng: np.random.Generator, rows: int) -> LabelledBatch:
        """`rows` sequences of conversations drawn from `rng` alone."""
        per_row = self.seq_len / self._mean_length if self.packed else 1.0

        def draws() -> Iterator[int]:
            while True:  # in chunks; the layout stops consuming when the rows are full
                yield from self._draw(rng, math.ceil(rows * per_row) + 2).tolist()

        return self.lay_out(tokens, draws(), rows)

    def lay_out(self, tokens: np.ndarray, docs: Iterable[int],
                rows: int | None = None) -> LabelledBatch:
        """Conversations `docs`, in order, as `rows` sequences (None: as many as they
        fill, every one of them placed); the benchmark and the tests lay out chosen ones."""
        seq_len = self.seq_len
        built: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

        def new_row() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            built.append((np.full(seq_len, self.pad_token_id, dtype=np.int64),
                          np.full(seq_len, IGNORE_INDEX, dtype=np.int64),
                          np.arange(seq_len, dtype=np.int64)))
            return built[-1]

        ids, labels, positions = new_row()
        fill = 0
        for doc in docs:
            length = int(self._lengths[doc])
            if fill + length > seq_len or (fill and not self.packed):
                positions[fill:] = np.arange(seq_len - fill)  # padding: a segment of its own
                if rows is not None and len(built) == rows:
                    break
                ids, labels, positions = new_row()
                fill = 0
            start = int(self._starts[doc])
            piece = tokens[start : start + length]
            ids[fill : fill + length] = piece
            labels[fill : fill + length] = np.where(self._mask[start : start + length] == 1,
                                                    piece, IGNORE_INDEX)
            labels[fill] = IGNORE_INDEX  # would be predicted across the boundary
            positions[fill : fill + length] = np.arange(length)
            fill += length
        else:
            positions[fill:] = np.arange(seq_len - fill)
            if rows is not None and len(built) < rows:
                raise ValueError(f"{len(built)} rows from the conversations given, {rows} "
                                 "asked")
        stacked = [torch.from_numpy(np.stack(part)) for part in zip(*built, strict=True)]
        return LabelledBatch(stacked[0], stacked[1], stacked[2] if self.packed else None)


def assistant_perplexity(model: PreTrainedModel, tokens: np.ndarray, loss_mask: np.ndarray,
                         offsets: np.ndarray, *, seq_len: int, batch_size: int = 16,
                         max_documents: int = 512) -> float:
    """exp(mean cross-entropy) over the assistant tokens of held-out conversations, each
    alone in its row (the first `seq_len` tokens of each): what the chat loss trains."""
    starts, lengths = offsets[:-1][:max_documents], np.minimum(np.diff(offsets), seq_len)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for first in range(0, len(starts), batch_size):
            chunk = range(first, min(first + batch_size, len(starts)))
            width = int(max(lengths[i] for i in chunk))
            ids = np.zeros((len(chunk), width), dtype=np.int64)
            labels = np.full((len(chunk), width), IGNORE_INDEX, dtype=np.int64)
            for r, i in enumerate(chunk):
                s, n = int(starts[i]), int(lengths[i])
                ids[r, :n] = tokens[s : s + n]
                labels[r, :n] = np.where(loss_mask[s : s + n] == 1, tokens[s : s + n],
                                         IGNORE_INDEX)
            x, y = torch.from_numpy(ids), torch.from_numpy(labels)
            logits = model(input_ids=x, use_cache=False).logits.float()
            target = y[:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((target != IGNORE_INDEX).sum())
    model.train(was_training)
    if not count:
        raise ValueError("held-out conversations without assistant tokens")
    return math.exp(total / count)
