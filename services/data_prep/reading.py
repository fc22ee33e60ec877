"""Reading raw datasets: JSONL and plain text, safely (the first reader).

`sources.py` reads every format, directories, globs and s3:// and owns
`DatasetInputError` and `resolve_dataset_path`; this module stays until the
pipeline reads through `sources.iter_documents`.

Only paths under the allowed data roots are read, never through a symlink
that leaves them, and only regular files. Records are read with a byte cap so
a 50 MB (or 5 GB) single line is skipped and counted instead of swallowing
memory; undecodable bytes skip the record, never the dataset.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from services.data_prep.sources import DatasetInputError, resolve_dataset_path

__all__ = ["FORMATS", "DatasetInputError", "ReadStats", "read_documents", "resolve_dataset_path"]

FORMATS = ("jsonl", "text")


@dataclass(slots=True)
class ReadStats:
    records_read: int = 0
    invalid_utf8_skipped: int = 0
    oversized_skipped: int = 0
    malformed_skipped: int = 0


def _bounded_lines(f: BinaryIO, max_bytes: int) -> Iterator[bytes | None]:
    """Yield lines of at most `max_bytes`, and None in place of each longer line
    (skipped without ever holding it whole)."""
    while True:
        line = f.readline(max_bytes + 1)
        if not line:
            return
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while chunk := f.readline(1 << 20):
                if chunk.endswith(b"\n"):
                    break
            yield None
            continue
        yield line


def _decode(raw: bytes, stats: ReadStats) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8_skipped += 1
        return None


def read_jsonl(path: Path, text_field: str, max_bytes: int, stats: ReadStats) -> Iterator[str]:
    with path.open("rb") as f:
        for line in _bounded_lines(f, max_bytes):
            if line is None:
                stats.records_read += 1
                stats.oversized_skipped += 1
                continue
            if not line.strip():
                continue
            stats.records_read += 1
            text = _decode(line, stats)
            if text is None:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                stats.malformed_skipped += 1
                continue
            value = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                stats.malformed_skipped += 1
                continue
            yield value


def read_text(path: Path, max_bytes: int, stats: ReadStats) -> Iterator[str]:
    """Plain text: documents are separated by blank lines or by a line holding only
    `%` (the fortune/strfile convention)."""
    lines: list[bytes] = []
    size = 0
    oversized = False
    with path.open("rb") as f:
        for line in itertools.chain(_bounded_lines(f, max_bytes), [b""]):
            separator = line is not None and (not line.strip() or line.strip() == b"%")
            if separator:
                if lines or oversized:
                    stats.records_read += 1
                    if oversized:
                        stats.oversized_skipped += 1
                    elif (text := _decode(b"".join(lines), stats)) is not None:
                        yield text
                lines, size, oversized = [], 0, False
                continue
            size += max_bytes + 1 if line is None else len(line)
            if line is None or size > max_bytes:
                oversized, lines = True, []
            else:
                lines.append(line)


def read_documents(path: Path, fmt: str, text_field: str, max_bytes: int,
                   stats: ReadStats) -> Iterator[str]:
    if fmt == "jsonl":
        return read_jsonl(path, text_field or "text", max_bytes, stats)
    if fmt == "text":
        return read_text(path, max_bytes, stats)
    raise DatasetInputError(f"format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
