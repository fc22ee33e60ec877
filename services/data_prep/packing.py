"""Tokenizing documents and packing them into fixed-size token shards.

Documents are joined with an end-of-text token into one stream and cut into
shards of `shard_tokens` tokens, stored as safetensors (never pickles). The
trainer reads fixed-length windows from the stream, so no position is spent
on padding.

Beside the shards, `documents.safetensors` records where each document lies in
the stream and how often the trainer should sample it:

- `offsets`: int64 [documents + 1], the token offset of each document's first
  token (its end-of-text token is the last of its range), then the total;
- `weights`: float32 [documents], the sampling multiplier of each document
  (1.0 = its natural share, by tokens; the semantic stage's long-tail weights).

The part's entry in dataset.json (`ShardWriter.manifest()`) names the file:
`{"shards": [...], "tokens": N, "documents": D, "document_index":
"documents.safetensors", "weighted": true}`; "weighted" is false when every
weight is 1, and the trainer then samples windows uniformly, as before weights.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer

DOCUMENT_INDEX = "documents.safetensors"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(
        np.uint32
    )


class ShardWriter:
    """Appends token ids and writes `shard-NNNNN.safetensors` files of fixed size."""

    def __init__(self, directory: Path, shard_tokens: int, dtype: np.dtype) -> None:
        self.directory = directory
        self.shard_tokens = shard_tokens
        self.dtype = dtype
        self.directory.mkdir(parents=True, exist_ok=True)
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self.shards: list[str] = []
        self.total_tokens = 0
        self._offsets = array("q")
        self._weights = array("f")

    @property
    def documents(self) -> int:
        return len(self._offsets)

    def add(self, ids: np.ndarray, weight: float = 1.0) -> None:
        """Append one document's tokens (its end-of-text token included)."""
        if not weight > 0:
            raise ValueError(f"document weight {weight} must be > 0 (drop the document "
                             "instead)")
        self._offsets.append(self.total_tokens)
        self._weights.append(weight)
        self._pending.append(ids.astype(self.dtype, copy=False))
        self._pending_len += len(ids)
        self.total_tokens += len(ids)
        while self._pending_len >= self.shard_tokens:
            stream = np.concatenate(self._pending)
            self._write(stream[: self.shard_tokens])
            rest = stream[self.shard_tokens :]
            self._pending, self._pending_len = [rest], len(rest)

    def close(self) -> None:
        """Write the last, shorter shard and the document index."""
        if self._pending_len:
            self._write(np.concatenate(self._pending))
        self._pending, self._pending_len = [], 0
        offsets = np.append(np.frombuffer(self._offsets, dtype=np.int64), self.total_tokens)
        save_file({"offsets": offsets.astype(np.int64),
                   "weights": np.frombuffer(self._weights, dtype=np.float32).copy()},
                  str(self.directory / DOCUMENT_INDEX))

    def manifest(self) -> dict[str, Any]:
        """This part's entry in dataset.json (after `close`)."""
        weights = np.frombuffer(self._weights, dtype=np.float32)
        return {"shards": list(self.shards), "tokens": self.total_tokens,
                "documents": self.documents, "document_index": DOCUMENT_INDEX,
                "weighted": bool(len(weights) and np.any(weights != weights[0]))}

    def _write(self, tokens: np.ndarray) -> None:
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file({"tokens": np.ascontiguousarray(tokens)}, str(self.directory / name))
        self.shards.append(name)


def encode_documents(tokenizer: Tokenizer, texts: Iterable[str], eos_id: int,
                     writer: ShardWriter, *, batch_size: int = 256,
                     weights: Iterable[float] | None = None) -> int:
    """Tokenize `texts` in batches into `writer`; returns the number of documents.

    `weights`, in the order of `texts`, are the documents' sampling multipliers
    (all 1.0 when not given).
    """
    count = 0
    batch: list[str] = []
    batch_weights: list[float] = []
    weight_iter: Iterator[float] | None = iter(weights) if weights is not None else None

    def flush() -> None:
        encodings = tokenizer.encode_batch(batch, add_special_tokens=False)
        for encoding, weight in zip(encodings, batch_weights, strict=True):
            writer.add(np.asarray([*encoding.ids, eos_id], dtype=np.int64), weight)

    for text in texts:
        batch.append(text)
        if weight_iter is None:
            batch_weights.append(1.0)
        else:
            weight = next(weight_iter, None)
            if weight is None:
                raise ValueError(f"fewer weights than documents ({count})")
            batch_weights.append(weight)
        count += 1
        if len(batch) >= batch_size:
            flush()
            batch, batch_weights = [], []
    if batch:
        flush()
    if weight_iter is not None and next(weight_iter, None) is not None:
        raise ValueError(f"more weights than documents ({count})")
    return count
