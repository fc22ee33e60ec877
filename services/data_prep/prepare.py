"""The data-prep stage as one function: raw dataset in, dataset directory out.

read -> normalise -> drop empty and exact duplicates -> stable held-out split
-> train the tokenizer on the training part -> pack both parts into shards.
Kept documents are spooled to disk between the passes, so memory does not
grow with the dataset.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.data_prep.cleaning import (
    ExactDeduplicator,
    document_digest,
    is_heldout,
    normalize_text,
)
from services.data_prep.packing import ShardWriter, encode_documents, token_dtype
from services.data_prep.reading import DatasetInputError, ReadStats, read_documents
from services.data_prep.tokenizer_training import (
    EOS_TOKEN,
    save_tokenizer,
    train_bpe_tokenizer,
)


@dataclass(kw_only=True, slots=True)
class PrepConfig:
    vocab_size: int = 4096
    """Target BPE vocabulary; smaller corpora stop earlier when merges run out."""
    seq_len: int = 128
    """Training context length recorded for the trainer and the scheduler."""
    heldout_fraction: float = 0.05
    """Share of documents (by hash) kept out of training for perplexity."""
    max_record_bytes: int = 1_000_000
    """Longer records are skipped and counted, never loaded."""
    shard_tokens: int = 1_000_000
    """Tokens per shard file."""

    def __post_init__(self) -> None:
        if not 256 < self.vocab_size <= 1 << 20:
            raise ValueError(f"vocab_size {self.vocab_size} must be in (256, 1048576]")
        if not 0 < self.heldout_fraction < 0.5:
            raise ValueError(f"heldout_fraction {self.heldout_fraction} must be in (0, 0.5)")


@dataclass(slots=True)
class PrepStats:
    """What preparing a dataset counted: the reader's counts plus the cleaning and packing.

    `as_flat_dict()` has the field names of the `DatasetStats` event and of
    `dataset.json`'s "stats", so neither copies the fields one by one.
    """

    read: ReadStats = field(default_factory=ReadStats)
    empty_dropped: int = 0
    duplicates_dropped: int = 0
    train_tokens: int = 0
    heldout_tokens: int = 0
    train_documents: int = 0
    heldout_documents: int = 0
    vocab_size: int = 0

    @property
    def records_kept(self) -> int:
        return self.train_documents + self.heldout_documents

    def as_flat_dict(self) -> dict[str, int]:
        own = {k: v for k, v in asdict(self).items() if k != "read"}
        return {**asdict(self.read), **own, "records_kept": self.records_kept}


def _spool(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def prepare_dataset(source: Path, fmt: str, text_field: str, out_dir: Path,
                    config: PrepConfig) -> PrepStats:
    """Build the dataset directory in `out_dir` (which must be empty or absent)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = PrepStats()
    read_stats = stats.read
    dedup = ExactDeduplicator()
    spool_dir = out_dir / ".spool"
    spool_dir.mkdir()
    train_spool, heldout_spool = spool_dir / "train.jsonl", spool_dir / "heldout.jsonl"
    with train_spool.open("w", encoding="utf-8") as train_f, \
            heldout_spool.open("w", encoding="utf-8") as heldout_f:
        for raw in read_documents(source, fmt, text_field, config.max_record_bytes, read_stats):
            text = normalize_text(raw)
            if not text:
                stats.empty_dropped += 1
                continue
            digest = document_digest(text)
            if dedup.is_duplicate(digest):
                stats.duplicates_dropped += 1
                continue
            if is_heldout(digest, config.heldout_fraction):
                heldout_f.write(json.dumps(text, ensure_ascii=False) + "\n")
                stats.heldout_documents += 1
            else:
                train_f.write(json.dumps(text, ensure_ascii=False) + "\n")
                stats.train_documents += 1

    if stats.train_documents == 0:
        raise DatasetInputError(
            f"dataset {source} has no usable documents (read {read_stats.records_read} records: "
            f"{stats.empty_dropped} empty, {stats.duplicates_dropped} duplicate, "
            f"{read_stats.invalid_utf8_skipped} invalid UTF-8, {read_stats.oversized_skipped} "
            f"over {config.max_record_bytes} bytes, {read_stats.malformed_skipped} malformed)"
        )
    if stats.heldout_documents == 0:
        # Tiny datasets: move one training document out so perplexity can be measured.
        moved = next(_spool(train_spool))
        rest = list(_spool(train_spool))[1:]
        if not rest:
            rest = [moved]  # a one-document dataset evaluates on its training text
        train_spool.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in rest))
        heldout_spool.write_text(json.dumps(moved, ensure_ascii=False) + "\n")
        stats.train_documents, stats.heldout_documents = len(rest), 1

    tokenizer = train_bpe_tokenizer(_spool(train_spool), config.vocab_size)
    save_tokenizer(tokenizer, out_dir / "tokenizer", model_max_length=config.seq_len)
    vocab_size = tokenizer.get_vocab_size()
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise RuntimeError(f"the trained tokenizer lacks its end-of-text token {EOS_TOKEN!r}")
    dtype = token_dtype(vocab_size)
    parts: dict[str, dict[str, Any]] = {}
    for part, spool in (("train", train_spool), ("heldout", heldout_spool)):
        writer = ShardWriter(out_dir / part, config.shard_tokens, dtype)
        encode_documents(tokenizer, _spool(spool), eos_id, writer)
        writer.close()
        parts[part] = {"shards": writer.shards, "tokens": writer.total_tokens}
    stats.train_tokens = int(parts["train"]["tokens"])
    stats.heldout_tokens = int(parts["heldout"]["tokens"])
    stats.vocab_size = vocab_size
    for spool in (train_spool, heldout_spool):
        spool.unlink()
    spool_dir.rmdir()
    metadata = {
        "format": "lmforge-token-shards/1",
        "vocab_size": vocab_size,
        "seq_len": config.seq_len,
        "eos_token_id": eos_id,
        "dtype": dtype.name,
        "train": parts["train"],
        "heldout": parts["heldout"],
        "stats": stats.as_flat_dict(),
    }
    (out_dir / "dataset.json").write_text(json.dumps(metadata, indent=1))
    return stats
