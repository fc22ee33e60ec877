"""Tokenizing documents and packing them into fixed-size token shards.

Documents are joined with an end-of-text token into one stream and cut into
shards of `shard_tokens` tokens, stored as safetensors (never pickles). The
trainer reads fixed-length windows from the stream, so no position is spent
on padding.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer


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

    def add(self, ids: np.ndarray) -> None:
        self._pending.append(ids.astype(self.dtype, copy=False))
        self._pending_len += len(ids)
        self.total_tokens += len(ids)
        while self._pending_len >= self.shard_tokens:
            stream = np.concatenate(self._pending)
            self._write(stream[: self.shard_tokens])
            rest = stream[self.shard_tokens :]
            self._pending, self._pending_len = [rest], len(rest)

    def close(self) -> None:
        if self._pending_len:
            self._write(np.concatenate(self._pending))
        self._pending, self._pending_len = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file({"tokens": np.ascontiguousarray(tokens)}, str(self.directory / name))
        self.shards.append(name)


def encode_documents(tokenizer: Tokenizer, texts: Iterable[str], eos_id: int,
                     writer: ShardWriter, *, batch_size: int = 256) -> int:
    """Tokenize `texts` in batches into `writer`; returns the number of documents."""
    count = 0
    batch: list[str] = []

    def flush() -> None:
        for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
            writer.add(np.asarray([*encoding.ids, eos_id], dtype=np.int64))

    for text in texts:
        batch.append(text)
        count += 1
        if len(batch) >= batch_size:
            flush()
            batch = []
    if batch:
        flush()
    return count
