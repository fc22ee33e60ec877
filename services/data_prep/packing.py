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
  (1.0 = its natural share, by tokens).

The weights are either given per document, or computed when the part is closed
from each document's cluster (the semantic stage's k-means label) by
`semantic.long_tail_weights` over the documents' token counts, so the natural
share they correct is the one the trainer samples from: computed on characters
before tokenizing, the rarest tenth of clusters of a Debian sample got 2.45x
instead of 3x, as characters per token differ between clusters (dictionary
entries, man pages, Chinese).

Chat datasets also store a loss mask beside the tokens: each shard holds a
`loss_mask` uint8 tensor of the same length as its `tokens` (1 where the token
is trained: an assistant's), so the mask is cut and resumed exactly as the
tokens are; the part's entry then says `"loss_mask": true`.

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

from lmforge.modeling import LOSS_MASK
from services.data_prep.semantic import long_tail_weights

DOCUMENT_INDEX = "documents.safetensors"



def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(
        np.uint32
    )


class ShardWriter:
    """Appends token ids and writes `shard-NNNNN.safetensors` files of fixed size."""

    def __init__(self, directory: Path, shard_tokens: int, dtype: np.dtype, *,
                 long_tail_cap: float = 3.0) -> None:
        self.directory = directory
        self.long_tail_cap = long_tail_cap
        self.shard_tokens = shard_tokens
        self.dtype = dtype
        self.directory.mkdir(parents=True, exist_ok=True)
        self._pending: list[np.ndarray] = []
        self._pending_masks: list[np.ndarray] = []
        self._pending_len = 0
        self.shards: list[str] = []
        self.total_tokens = 0
        self._offsets = array("q")
        self._weights = array("f")
        self._clusters = array("q")
        self._final_weights: np.ndarray | None = None
        self.masked = False
        """The documents carry loss masks (chat data)."""

    @property
    def documents(self) -> int:
        return len(self._offsets)

    def add(self, ids: np.ndarray, weight: float = 1.0, *, cluster: int | None = None,
            loss_mask: np.ndarray | None = None) -> None:
        """Append one document's tokens (its end-of-text token included), with its
        sampling multiplier or its cluster (weights are then computed at `close`), and
        for chat data its loss mask (one 0/1 per token; every document or none)."""
        if not weight > 0:
            raise ValueError(f"document weight {weight} must be > 0 (drop the document "
                             "instead)")
        if (cluster is None) != (not self._clusters) and self._offsets:
            raise ValueError("give a cluster for every document of a part or for none")
        if self._offsets and (loss_mask is None) == self.masked:
            raise ValueError("give a loss mask for every document of a part or for none")
        if loss_mask is not None and len(loss_mask) != len(ids):
            raise ValueError(f"loss mask of {len(loss_mask)} for {len(ids)} tokens")
        self.masked = loss_mask is not None
        self._offsets.append(self.total_tokens)
        self._weights.append(weight)
        if cluster is not None:
            self._clusters.append(cluster)
        self._pending.append(ids.astype(self.dtype, copy=False))
        if loss_mask is not None:
            self._pending_masks.append(loss_mask.astype(np.uint8, copy=False))
        self._pending_len += len(ids)
        self.total_tokens += len(ids)
        while self._pending_len >= self.shard_tokens:
            stream = np.concatenate(self._pending)
            masks = np.concatenate(self._pending_masks) if self.masked else None
            self._write(stream[: self.shard_tokens],
                        None if masks is None else masks[: self.shard_tokens])
            rest = stream[self.shard_tokens :]
            self._pending, self._pending_len = [rest], len(rest)
            if masks is not None:
                self._pending_masks = [masks[self.shard_tokens :]]

    def close(self) -> None:
        """Write the last, shorter shard and the document index."""
        if self._pending_len:
            self._write(np.concatenate(self._pending),
                        np.concatenate(self._pending_masks) if self.masked else None)
        self._pending, self._pending_masks, self._pending_len = [], [], 0
        offsets = np.append(np.frombuffer(self._offsets, dtype=np.int64), self.total_tokens)
        weights = np.frombuffer(self._weights, dtype=np.float32).copy()
        if self._clusters:
            weights = long_tail_weights(np.frombuffer(self._clusters, dtype=np.int64),
                                        np.diff(offsets), self.long_tail_cap).astype(np.float32)
        self._final_weights = weights
        save_file({"offsets": offsets.astype(np.int64), "weights": weights},
                  str(self.directory / DOCUMENT_INDEX))

    @property
    def weights(self) -> np.ndarray:
        """The documents' sampling multipliers as written (after `close`)."""
        if self._final_weights is None:
            raise RuntimeError("the writer is not closed yet")
        return self._final_weights

    def manifest(self) -> dict[str, Any]:
        """This part's entry in dataset.json (after `close`)."""
        weights = self.weights
        manifest: dict[str, Any] = {
            "shards": list(self.shards), "tokens": self.total_tokens,
            "documents": self.documents, "document_index": DOCUMENT_INDEX,
            "weighted": bool(len(weights) and np.any(weights != weights[0]))}
        if self.masked:
            manifest["loss_mask"] = True
        return manifest

    def _write(self, tokens: np.ndarray, loss_mask: np.ndarray | None = None) -> None:
        name = f"shard-{len(self.shards):05d}.safetensors"
        tensors = {"tokens": np.ascontiguousarray(tokens)}
        if loss_mask is not None:
            tensors[LOSS_MASK] = np.ascontiguousarray(loss_mask)
        save_file(tensors, str(self.directory / name))
        self.shards.append(name)


def encode_documents(tokenizer: Tokenizer, texts: Iterable[str], eos_id: int,
                     writer: ShardWriter, *, batch_size: int = 256,
                     weights: Iterable[float] | None = None,
                     clusters: Iterable[int] | None = None) -> int:
    """Tokenize `texts` in batches into `writer`; returns the number of documents.

    Either `weights` (the documents' sampling multipliers) or `clusters` (their
    k-means labels, weighted by the writer when it closes) may be given, in the
    order of `texts`; with neither, every weight is 1.0.
    """
    if weights is not None and clusters is not None:
        raise ValueError("give weights or clusters, not both")
    values: Iterator[float] | Iterator[int] | None = (
        iter(weights) if weights is not None else iter(clusters) if clusters is not None
        else None)
    count = 0
    batch: list[str] = []
    batch_values: list[Any] = []

    def flush() -> None:
        encodings = tokenizer.encode_batch(batch, add_special_tokens=False)
        for encoding, value in zip(encodings, batch_values, strict=True):
            ids = np.asarray([*encoding.ids, eos_id], dtype=np.int64)
            if clusters is not None:
                writer.add(ids, cluster=int(value))
            else:
                writer.add(ids, 1.0 if value is None else float(value))

    for text in texts:
        batch.append(text)
        if values is None:
            batch_values.append(None)
        else:
            value = next(values, None)
            if value is None:
                raise ValueError(f"fewer {'weights' if weights is not None else 'clusters'} "
                                 f"than documents ({count})")
            batch_values.append(value)
        count += 1
        if len(batch) >= batch_size:
            flush()
            batch, batch_values = [], []
    if batch:
        flush()
    if values is not None and next(values, None) is not None:
        raise ValueError(f"more {'weights' if weights is not None else 'clusters'} than "
                         f"documents ({count})")
    return count
