"""Reading raw datasets: JSONL and plain text, safely.

Only paths under the allowed data roots are read, never through a symlink
that leaves them, and only regular files. Records are read with a byte cap so
a 50 MB (or 5 GB) single line is skipped and counted instead of swallowing
memory; undecodable bytes skip the record, never the dataset.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from lmforge.failures import BadInput

FORMATS = ("jsonl", "text")


class DatasetInputError(BadInput, ValueError):
    """The dataset cannot be read as asked; the message says why and what to do."""


@dataclass(slots=True)
class ReadStats:
    records_read: int = 0
    invalid_utf8_skipped: int = 0
    oversized_skipped: int = 0
    malformed_skipped: int = 0


def resolve_dataset_path(uri: str, roots: list[Path]) -> Path:
    """Turn `uri` into a regular file under one of `roots`, or explain why not."""
    if not uri:
        raise DatasetInputError("dataset_uri is empty; give a path or a file:// URL")
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        raw = unquote(parsed.path) if parsed.scheme == "file" else uri
    else:
        raise DatasetInputError(
            f"dataset URI scheme {parsed.scheme!r} in {uri!r} is not supported; "
            "use a local path or a file:// URL"
        )
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise DatasetInputError(f"dataset path {raw!r} must be absolute")
    resolved = path.resolve()
    joined = os.pathsep.join(str(r) for r in roots)
    if not any(resolved.is_relative_to(root) for root in roots):
        raise DatasetInputError(
            f"dataset path {str(path)!r} is outside the allowed roots (LMFORGE_DATA_ROOTS={joined})"
        )
    if not resolved.exists():
        raise DatasetInputError(f"dataset path {str(path)!r} does not exist")
    if not resolved.is_file():
        raise DatasetInputError(f"dataset path {str(path)!r} is not a regular file")
    return resolved


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
