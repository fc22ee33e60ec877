"""Reading a dataset: files, directories, globs and s3:// prefixes, every format, streamed.

A dataset is one spec or several: a file, a directory (every file under it,
recursively), a glob (`/data/exports/**/*.jsonl`), or an object-store URL
(`s3://bucket/prefix/`, `s3://bucket/key.parquet`, `s3://bucket/logs/*.gz`).
Many files make one dataset, read in a stable order (sorted by path or key);
names starting with `.` or `_` inside a directory or prefix are skipped (editor
files, Spark's `_SUCCESS`). Each file is JSONL, plain text, CSV, TSV or Parquet,
given or inferred from its name, and may be `.gz` or `.zst` (also recognised by
its magic bytes).

Safety. Only data under the allowed roots is read (`LMFORGE_DATA_ROOTS`, local
directories and bucket prefixes such as `s3://corp-bucket/exports/`): local
paths are resolved first, so no symlink leads out, and only regular files are
read. S3 credentials and the endpoint come from the standard AWS environment
(`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL`,
...) or `ReadConfig.s3_endpoint_url`. Nothing of the user's data is written
anywhere but `spool_dir` (the run's work directory), and only to decompress a
compressed Parquet file, which needs random access.

Bad content never stops the run: it is dropped and counted in the
`DecisionLog` under stage "read" with one of the `ReadReason` codes, per record
(`read.oversized`, `read.malformed_json`, ...) or per file, with the file's URL
as the id (`read.binary`, `read.expansion_cap`, ...). A file refused midway (a
bomb past the expansion cap, a truncated stream) keeps the records read before
the point of refusal: the reader streams and cannot take them back. A problem
with the dataset itself (outside the roots, missing, access denied, a local file
written or replaced while it was read, an empty
glob, a CSV without the text column, a Parquet text column that is not a
string) raises `DatasetInputError`, a `BadInput`: the bus fails the run once
with `stage.failed` and the message, which names the path or URL and the cause.

Memory is bounded by the per-record cap plus fixed buffers: 1 MiB of read
buffer, `s3_block_bytes` of object-store read-ahead, the decompressor's window
(zstd refuses windows over 128 MiB; the CLI's default levels use 1-8 MiB) and,
for Parquet, one batch of `parquet_batch_rows` rows plus the pages pyarrow
decodes (buffered page reads; the writer's row-group size still counts).
benchmarks/dataprep/ingest.py, 1.45 GB expanded in five formats on 2 busy
cores: 114k docs/s, 38.7 MB/s, peak RSS 162 MB of which 119 MB is the imports
(pyarrow, s3fs); JSONL and CSV add ~1 MB, Parquet with 64k-row groups ~32 MB.

Encodings. The first 64 KiB of each text file decide: UTF-8 (a UTF-8 BOM is
dropped) is read as is; a UTF-16/32 BOM, or what charset-normalizer detects
with enough coherence (GB18030 for the GB family, UTF-16 without a BOM, Big5,
...) is transcoded to UTF-8 on the fly; NUL bytes without a UTF-16/32 reading
make the file `read.binary`; anything else is `read.unknown_encoding`, with the
best guess in the detail. A file whose start is UTF-8 but has bad bytes later
loses only the records holding them (`read.invalid_utf8`).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import glob as globbing
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol
from urllib.parse import unquote, urlparse

from lmforge.failures import BadInput
from services.data_prep.documents import DecisionLog, Document, chat_text

STAGE = "read"
FORMATS = ("auto", "jsonl", "text", "csv", "tsv", "parquet")
"""Dataset formats; "auto" infers each file's format from its name."""

_EXTENSIONS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "text", ".text": "text", "": "text",
    ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet",
}
_COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GLOB_CHARS = re.compile(r"[*?\[]")
_SNIFF_BYTES = 64 << 10
_BUFFER_BYTES = 1 << 20


class DatasetInputError(BadInput, ValueError):
    """The dataset cannot be read as asked; the message says why and what to do."""


class ReadReason(StrEnum):
    """Why the reader dropped a record (per record) or a whole file (per file)."""

    OVERSIZED = "read.oversized"
    """A record over `max_record_bytes`; skipped without being held whole."""
    INVALID_UTF8 = "read.invalid_utf8"
    """A record of a UTF-8 file with bytes that are not UTF-8."""
    NUL_BYTES = "read.nul_bytes"
    """A record holding NUL bytes (binary junk inside a text file)."""
    MALFORMED_JSON = "read.malformed_json"
    """A JSONL line that does not parse."""
    NOT_AN_OBJECT = "read.not_an_object"
    """A JSONL line that parses to something other than an object."""
    MISSING_TEXT = "read.missing_text"
    """A record whose text field is absent, null or not a string."""
    MALFORMED_CHAT = "read.malformed_chat"
    """A chat record (`messages`, or `prompt` + `response`) that is not a list of
    {role, content} turns with string contents, known roles and an assistant turn."""
    MALFORMED_CSV = "read.malformed_csv"
    """A CSV/TSV row the csv module rejects."""
    BINARY = "read.binary"
    """Per file: NUL bytes and no UTF-16/32 reading; an image, an archive, a database."""
    UNKNOWN_ENCODING = "read.unknown_encoding"
    """Per file: not UTF-8 and no confident detection (the guess is in the detail)."""
    DECODE_ERROR = "read.decode_error"
    """Per file: bytes invalid in the detected encoding, from that point on."""
    EXPANSION_CAP = "read.expansion_cap"
    """Per file: a .gz/.zst expanding past `max_expanded_bytes` or `max_expansion_ratio`."""
    CORRUPT_FILE = "read.corrupt_file"
    """Per file: a truncated or damaged .gz/.zst, or a file that is not Parquet."""
    UNKNOWN_FORMAT = "read.unknown_format"
    """Per file: a name with no known format, in a dataset of several files."""


@dataclass(kw_only=True, slots=True)
class ReadConfig:
    """How to read a dataset; the defaults suit a corpus of exports."""

    format: str = "auto"
    """One of FORMATS; "auto" infers each file's from its name (after .gz/.zst)."""
    text_field: str = "text"
    """The JSON key, CSV/TSV column or Parquet column holding each document's text."""
    id_field: str = "id"
    """Where a record's own id lives; a record without one is `<source>#<ordinal>`."""
    max_record_bytes: int = 1_000_000
    """Longer records are skipped and counted (read.oversized), never held whole."""
    max_expanded_bytes: int = 64 << 30
    """A compressed file expanding past this is refused from there on (read.expansion_cap)."""
    max_expansion_ratio: float = 200.0
    """Expanded / compressed bytes above this, past `expansion_ratio_after_bytes`, is a bomb.
    Text compresses 3-10x with gzip and zstd; a gzip bomb expands ~1000x."""
    expansion_ratio_after_bytes: int = 64 << 20
    """The ratio is judged only past this many expanded bytes, so small files pass."""
    s3_endpoint_url: str = ""
    """An S3-protocol endpoint (MinIO, moto); empty: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL
    from the environment, else AWS itself."""
    s3_block_bytes: int = 4 << 20
    """Read-ahead per object-store file; also the memory each open object holds."""
    encoding_min_coherence: float = 0.10
    """A detected non-UTF-8 encoding is used only with at least this language coherence
    (charset-normalizer's 0-1 score); UTF-16/32 are recognised by structure instead."""
    encoding_max_chaos: float = 0.10
    """... and at most this mess (charset-normalizer's 0-1 chaos score)."""
    parquet_batch_rows: int = 1024
    """Rows per Parquet batch held at once."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        if not self.text_field:
            raise ValueError("text_field is empty; name the field holding the text")
        if self.max_record_bytes < 1:
            raise ValueError(f"max_record_bytes {self.max_record_bytes} must be positive")
        if self.max_expanded_bytes < 1 or self.max_expansion_ratio <= 1:
            raise ValueError(f"max_expanded_bytes {self.max_expanded_bytes} must be positive "
                             f"and max_expansion_ratio {self.max_expansion_ratio} above 1")
        if self.parquet_batch_rows < 1 or self.s3_block_bytes < 1 << 16:
            raise ValueError(f"parquet_batch_rows {self.parquet_batch_rows} must be positive "
                             f"and s3_block_bytes {self.s3_block_bytes} at least 65536")


# --- allowed roots ---------------------------------------------------------------------


def split_data_roots(value: str) -> list[str]:
    """Split an `LMFORGE_DATA_ROOTS` value on os.pathsep and commas, keeping `s3://` whole:
    `/data:s3://corp-bucket/exports/` is two roots, not three."""
    sep = re.escape(os.pathsep)
    parts = re.split(rf",|{sep}(?!//)", value)
    return [p.strip() for p in parts if p.strip()]


@dataclass(frozen=True, slots=True)
class DataRoots:
    """Where datasets may be read from: local directories and bucket prefixes."""

    local: tuple[Path, ...] = ()
    buckets: tuple[tuple[str, str], ...] = ()
    """(bucket, key prefix): the prefix is "" (the whole bucket) or ends with "/"."""
    setting: str = "LMFORGE_DATA_ROOTS"
    """Where the roots were configured, for messages (a tenant's own roots say so)."""

    @classmethod
    def parse(cls, roots: Iterable[str | os.PathLike[str]] | DataRoots, *,
              setting: str = "LMFORGE_DATA_ROOTS") -> DataRoots:
        if isinstance(roots, DataRoots):
            return roots
        local: list[Path] = []
        buckets: list[tuple[str, str]] = []
        for root in roots:
            text = os.fspath(root)
            scheme = urlparse(text).scheme
            if scheme == "s3":
                bucket, key = _split_s3(text)
                if not bucket:
                    raise ValueError(f"data root {text!r} names no bucket; use s3://bucket/prefix/")
                buckets.append((bucket, key.strip("/") + "/" if key.strip("/") else ""))
            elif scheme in ("", "file"):
                raw = unquote(urlparse(text).path) if scheme == "file" else text
                local.append(Path(raw).expanduser().resolve())
            else:
                raise ValueError(f"data root {text!r}: scheme {scheme!r} is not supported; "
                                 "use a directory or s3://bucket/prefix/")
        return cls(tuple(local), tuple(buckets), setting)

    def describe(self) -> str:
        """The roots as `LMFORGE_DATA_ROOTS` would list them, for messages."""
        return os.pathsep.join([*(str(p) for p in self.local),
                                *(f"s3://{b}/{p}" for b, p in self.buckets)])

    def allows_path(self, resolved: Path) -> bool:
        return any(resolved.is_relative_to(root) for root in self.local)

    def allows_object(self, bucket: str, key: str) -> bool:
        key = key.strip("/")
        return any(bucket == b and (not p or key == p[:-1] or key.startswith(p))
                   for b, p in self.buckets)


# --- what a dataset is made of ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One file of a dataset."""

    url: str
    """The absolute local path, or `s3://bucket/key`; the `source` of its documents."""
    size: int
    """Bytes as stored (compressed, where compressed)."""
    version: str
    """What changes when the contents do: `<size>:<mtime_ns>` locally, the ETag on S3."""
    format: str
    """jsonl, text, csv, tsv or parquet; "" when the name tells none (counted, not read)."""
    compression: str = ""
    """gzip or zstd by the name; a file without the suffix is still sniffed by its magic."""


def _split_s3(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    return parsed.netloc, unquote(parsed.path).lstrip("/")


def _name_format(name: str, given: str) -> tuple[str, str]:
    """(format, compression) from a file name, or the given format."""
    stem, ext = os.path.splitext(name.lower())
    compression = _COMPRESSIONS.get(ext, "")
    if compression:
        stem, ext = os.path.splitext(stem)
    if given != "auto":
        return given, compression
    return _EXTENSIONS.get(ext, ""), compression


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def resolve_dataset_path(uri: str, roots: list[Path]) -> Path:
    """Turn `uri` into one regular local file under one of `roots`, or explain why not.

    The single-file rules of the first reader; `list_dataset_files` applies the
    same rules to directories, globs and bucket prefixes.
    """
    path = _local_spec(uri)
    if path.is_dir():
        raise DatasetInputError(f"dataset path {str(path)!r} is not a regular file")
    return _checked_local(path, DataRoots.parse(roots))


def _local_spec(uri: str) -> Path:
    if not uri:
        raise DatasetInputError("dataset_uri is empty; give a path or a file:// URL")
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise DatasetInputError(
            f"dataset URI scheme {parsed.scheme!r} in {uri!r} is not supported; "
            "use a local path or a file:// URL"
        )
    raw = unquote(parsed.path) if parsed.scheme == "file" else uri
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise DatasetInputError(f"dataset path {raw!r} must be absolute")
    return path


def _checked_local(path: Path, roots: DataRoots, *, allow_dir: bool = False) -> Path:
    resolved = path.resolve()
    if not roots.allows_path(resolved):
        raise DatasetInputError(f"dataset path {str(path)!r} is outside the allowed roots "
                                f"({roots.setting}={roots.describe()})")
    if not resolved.exists():
        raise DatasetInputError(f"dataset path {str(path)!r} does not exist")
    if not (resolved.is_file() or (allow_dir and resolved.is_dir())):
        raise DatasetInputError(f"dataset path {str(path)!r} is not a regular file")
    return resolved


def _local_file(path: Path, given: str) -> SourceFile:
    st = path.stat()
    fmt, compression = _name_format(path.name, given)
    return SourceFile(str(path), st.st_size, f"{st.st_size}:{st.st_mtime_ns}", fmt, compression)


def _list_local(spec: str, roots: DataRoots, given: str) -> list[SourceFile]:
    path = _local_spec(spec)
    if _GLOB_CHARS.search(str(path)):
        fixed = Path(*itertools.takewhile(lambda part: not _GLOB_CHARS.search(part), path.parts))
        _check_under_roots(fixed, roots, spec)
        matches = sorted(globbing.glob(str(path), recursive=True))
        paths = [_checked_local(Path(m), roots) for m in matches if Path(m).resolve().is_file()]
        if not paths:
            raise DatasetInputError(f"dataset glob {spec!r} matched no files")
        return [_local_file(p, given) for p in paths]
    resolved = _checked_local(path, roots, allow_dir=True)
    if resolved.is_file():
        return [_local_file(resolved, given)]
    found: list[tuple[str, Path]] = []
    for top, dirs, names in os.walk(resolved):
        dirs[:] = [d for d in dirs if not _hidden(d)]
        for name in names:
            if _hidden(name):
                continue
            target = _checked_local(Path(top) / name, roots, allow_dir=True)
            if target.is_file():
                found.append(((Path(top) / name).relative_to(resolved).as_posix(), target))
    if not found:
        raise DatasetInputError(f"dataset directory {str(path)!r} holds no files")
    # Sorted by relative path, as S3 lists keys: a directory and its upload read alike.
    return [_local_file(target, given) for _, target in sorted(found)]


def _check_under_roots(fixed: Path, roots: DataRoots, spec: str) -> None:
    if not roots.allows_path(fixed.resolve()):
        raise DatasetInputError(f"dataset path {spec!r} is outside the allowed roots "
                                f"({roots.setting}={roots.describe()})")


def _s3_failure(url: str, exc: BaseException) -> DatasetInputError | None:
    """The dataset-level meaning of an object-store error, or None for a transient one."""
    cause = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, FileNotFoundError):
        return DatasetInputError(f"dataset URL {url!r} does not exist ({cause}); "
                                 "check the bucket and the key")
    if isinstance(exc, PermissionError):
        return DatasetInputError(
            f"access to dataset URL {url!r} was denied ({cause}); check the AWS credentials "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket policy")
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return DatasetInputError(
            f"no AWS credentials to read dataset URL {url!r} ({cause}); set AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    return None


@contextlib.contextmanager
def _s3_errors(url: str) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError, RuntimeError) as exc:
        if isinstance(exc, DatasetInputError) or (failure := _s3_failure(url, exc)) is None:
            raise
        raise failure from exc


def _s3_filesystem(config: ReadConfig) -> Any:
    try:
        import s3fs
    except ImportError as exc:  # the data-prep extra brings it
        raise RuntimeError("reading s3:// datasets needs s3fs; install lmforge[data-prep]") from exc
    options: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False,
                               "default_block_size": config.s3_block_bytes}
    if config.s3_endpoint_url:
        options["endpoint_url"] = config.s3_endpoint_url
    return s3fs.S3FileSystem(**options)


def _s3_file(info: dict[str, Any], given: str) -> SourceFile:
    name = str(info["name"])
    fmt, compression = _name_format(name.rsplit("/", 1)[-1], given)
    return SourceFile(f"s3://{name}", int(info.get("size") or 0),
                      str(info.get("ETag") or info.get("LastModified") or ""), fmt, compression)


def _list_s3(spec: str, roots: DataRoots, given: str, fs: Any) -> list[SourceFile]:
    bucket, key = _split_s3(spec)
    if not bucket:
        raise DatasetInputError(f"dataset URL {spec!r} names no bucket; use s3://bucket/prefix/")
    if any(part in (".", "..") for part in key.split("/")):
        raise DatasetInputError(f"dataset URL {spec!r} has '.' or '..' segments; give the key "
                                "as stored")
    glob_at = _GLOB_CHARS.search(key)
    fixed = key if glob_at is None else key[:glob_at.start()].rpartition("/")[0]
    if not roots.allows_object(bucket, fixed):
        raise DatasetInputError(f"dataset URL {spec!r} is outside the allowed roots "
                                f"({roots.setting}={roots.describe()})")
    path = f"{bucket}/{key}".rstrip("/")
    denied: PermissionError | None = None
    with _s3_errors(spec):
        if glob_at is not None:
            found = fs.glob(path, detail=True)
            files = [_s3_file(info, given) for _, info in sorted(found.items())
                     if info.get("type") == "file"]
            if not files:
                raise DatasetInputError(f"dataset glob {spec!r} matched no files")
            return files
        if key and not key.endswith("/"):
            # A key, or a prefix named without its slash. Listing alone may be allowed
            # where reading is not (a HEAD then answers 403): fall back to the listing.
            try:
                info = fs.info(path)
            except PermissionError as exc:
                info, denied = {}, exc
            if info.get("type") == "file":
                return [_s3_file(info, given)]
        found = fs.find(path + "/" if key else path, detail=True)
        if not found and denied is not None:
            raise denied
    if not found:
        raise DatasetInputError(f"dataset URL {spec!r} does not exist (no object has that "
                                "key or prefix); check the bucket and the key")
    files = [_s3_file(info, given) for name, info in sorted(found.items())
             if not name.endswith("/") and not _hidden_below(name, path)]
    if not files:
        raise DatasetInputError(f"dataset URL {spec!r} holds no files (only hidden ones)")
    return files


def _hidden_below(name: str, top: str) -> bool:
    """Whether a file or a folder between `top` and the file starts with . or _."""
    return any(_hidden(part) for part in name[len(top):].split("/") if part)


def list_dataset_files(specs: str | Sequence[str],
                       roots: Iterable[str | os.PathLike[str]] | DataRoots, *,
                       config: ReadConfig | None = None, s3: Any = None) -> list[SourceFile]:
    """Every file the dataset `specs` name, in reading order, each checked against `roots`.

    Raises DatasetInputError for a spec outside the roots, missing, denied, or
    matching no file, and for a single file whose name tells no format.
    """
    config = config or ReadConfig()
    allowed = DataRoots.parse(roots)
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise DatasetInputError(
            "no dataset given; name a file, a directory, a glob or an s3:// URL")
    files: list[SourceFile] = []
    seen: set[str] = set()
    for spec in specs:
        if urlparse(spec).scheme == "s3":
            s3 = s3 if s3 is not None else _s3_filesystem(config)
            found = _list_s3(spec, allowed, config.format, s3)
        else:
            found = _list_local(spec, allowed, config.format)
        if len(specs) == 1 and len(found) == 1 and not found[0].format:
            raise DatasetInputError(
                f"dataset {found[0].url!r}: its name tells no format; give the format "
                f"({', '.join(FORMATS[1:])}) or name it .jsonl, .txt, .csv, .tsv or .parquet")
        files.extend(f for f in found if f.url not in seen)
        seen.update(f.url for f in found)
    return files


# --- bytes in: compression, caps, encodings --------------------------------------------


class _FileRefused(Exception):
    """Raised inside a file's reading to drop the rest of the file for `reason`."""

    def __init__(self, reason: ReadReason, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _Counted(io.RawIOBase):
    """Counts the stored bytes read (for the expansion ratio); optionally shows them to a
    zstd frame walker."""

    def __init__(self, raw: IO[bytes], observe: Callable[[bytes], None] | None = None) -> None:
        self._raw, self._observe = raw, observe
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.bytes_read += n
        if self._observe is not None:
            self._observe(data)
        return n


class _ZstdFrames:
    """Walks zstd frame and block headers as the compressed bytes pass, so a truncated
    stream is told from a complete one (python-zstandard's reader just ends early)."""

    def __init__(self) -> None:
        self._head = b""
        self._skip = 0
        self._state = "frame"
        self._checksum = False

    @property
    def complete(self) -> bool:
        return self._state == "frame" and not self._skip and not self._head

    def feed(self, data: bytes) -> None:
        if self._head:
            data, self._head = self._head + data, b""
        pos, end = 0, len(data)
        while True:
            if self._skip:
                step = min(self._skip, end - pos)
                pos, self._skip = pos + step, self._skip - step
                if self._skip:
                    return
            if self._state == "frame":
                if end - pos < 8:
                    self._head = data[pos:]
                    return
                magic = int.from_bytes(data[pos:pos + 4], "little")
                if magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame
                    self._skip = int.from_bytes(data[pos + 4:pos + 8], "little")
                    pos += 8
                    continue
                if magic != 0xFD2FB528:
                    raise _FileRefused(ReadReason.CORRUPT_FILE, "not a zstd frame")
                fhd = data[pos + 4]
                single = fhd >> 5 & 1
                size = (5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
                        + ((1 if single else 0), 2, 4, 8)[fhd >> 6])
                if end - pos < size:
                    self._head = data[pos:]
                    return
                self._checksum = bool(fhd >> 2 & 1)
                self._state, pos = "block", pos + size
            elif self._state == "block":
                if end - pos < 3:
                    self._head = data[pos:]
                    return
                header = int.from_bytes(data[pos:pos + 3], "little")
                kind, last = header >> 1 & 3, header & 1
                if kind == 3:
                    raise _FileRefused(ReadReason.CORRUPT_FILE, "reserved zstd block type")
                self._skip = 1 if kind == 1 else header >> 3
                pos += 3
                if last:
                    self._state = "checksum" if self._checksum else "frame"
            else:
                self._skip, self._state = 4, "frame"
            if pos >= end and not self._skip:
                return


class _Expanded(io.RawIOBase):
    """The file's bytes after decompression, as UTF-8: caps the expansion, turns a
    damaged stream into a refusal, and transcodes a detected non-UTF-8 encoding."""

    def __init__(self, source: _Readable, counted: _Counted, compression: str,
                 config: ReadConfig, frames: _ZstdFrames | None) -> None:
        self._source, self._counted, self._compression = source, counted, compression
        self._config, self._frames = config, frames
        self._pending = b""
        self._out = b""
        self._decoder: codecs.IncrementalDecoder | None = None
        self._encoding = ""
        self._broken: _FileRefused | None = None
        self._eof = False
        self.expanded = 0

    def readable(self) -> bool:
        return True

    def _pull(self, n: int) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        if self._eof:
            return b""
        try:
            data = self._source.read(n)
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise _FileRefused(ReadReason.CORRUPT_FILE, f"{self._compression}: {exc}") from exc
        except Exception as exc:
            if type(exc).__name__ == "ZstdError":
                raise _FileRefused(ReadReason.CORRUPT_FILE, f"zstd: {exc}") from exc
            raise
        if not data:
            self._eof = True
            if self._frames is not None and not self._frames.complete:
                raise _FileRefused(ReadReason.CORRUPT_FILE, "zstd: the stream ends mid-frame")
            return data
        self.expanded += len(data)
        if self._compression:
            config = self._config
            if self.expanded > config.max_expanded_bytes:
                raise _FileRefused(ReadReason.EXPANSION_CAP,
                                   f"expands past max_expanded_bytes={config.max_expanded_bytes}")
            ratio = self.expanded / max(1, self._counted.bytes_read)
            if (self.expanded > config.expansion_ratio_after_bytes
                    and ratio > config.max_expansion_ratio):
                raise _FileRefused(
                    ReadReason.EXPANSION_CAP,
                    f"expands {ratio:.0f}x (max_expansion_ratio={config.max_expansion_ratio:g})")
        return data

    def sample(self, n: int) -> tuple[bytes, bool]:
        """The first `n` bytes (fewer at the end of the file), kept to be read again."""
        chunks, size = [], 0
        while size < n and (chunk := self._pull(n - size)):
            chunks.append(chunk)
            size += len(chunk)
        self._pending = b"".join(chunks)
        return self._pending, self._eof

    def skip(self, n: int) -> None:
        self._pending = self._pending[n:]

    def transcode_from(self, encoding: str) -> None:
        self._encoding = encoding
        self._decoder = codecs.getincrementaldecoder(encoding)("strict")

    def readinto(self, buffer: Any) -> int:
        want = len(buffer)
        if self._decoder is None:
            data = self._pull(want)
            buffer[:len(data)] = data
            return len(data)
        while not self._out:
            if self._broken is not None:
                raise self._broken
            data = self._pull(want)
            try:
                self._out = self._decoder.decode(data, final=not data).encode("utf-8")
            except UnicodeDecodeError as exc:
                # Pass on the text before the bad bytes (the error's object is the
                # decoder's carry-over plus `data`), then refuse the rest.
                self._out = bytes(exc.object[:exc.start]).decode(self._encoding).encode("utf-8")
                self._broken = _FileRefused(ReadReason.DECODE_ERROR,
                                            f"bytes invalid in {self._encoding}: {exc.reason}")
            if not data:
                break
        n = min(want, len(self._out))
        buffer[:n], self._out = self._out[:n], self._out[n:]
        return n


def _decompressed(raw: IO[bytes], compression: str, config: ReadConfig) -> _Expanded:
    """The expanded stream of a stored file, its compression named or sniffed."""
    if not compression:
        magic = raw.read(4)
        raw.seek(0)
        compression = ("gzip" if magic.startswith(_GZIP_MAGIC)
                       else "zstd" if magic == _ZSTD_MAGIC else "")
    frames = _ZstdFrames() if compression == "zstd" else None
    counted = _Counted(raw, frames.feed if frames is not None else None)
    stored = io.BufferedReader(counted, _BUFFER_BYTES)
    source: _Readable
    if compression == "gzip":
        source = gzip.GzipFile(fileobj=stored, mode="rb")
    elif compression == "zstd":
        try:
            import zstandard
        except ImportError as exc:
            raise RuntimeError("reading .zst needs zstandard; install lmforge[data-prep]") from exc
        source = zstandard.ZstdDecompressor().stream_reader(stored, read_across_frames=True,
                                                            closefd=False)
    else:
        source = raw  # no second buffer for stored text
    return _Expanded(source, counted, compression, config, frames)


# UTF-32 first: its little-endian BOM begins with UTF-16's. The BOM is skipped and the
# byte order named, so a fresh decoder can decode any prefix of the rest.
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF32_LE, "utf-32-le"),
         (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF16_LE, "utf-16-le"),
         (codecs.BOM_UTF16_BE, "utf-16-be"))
_GB_FAMILY = {"gb2312", "gbk", "gb18030"}
_ENCODING_MARGIN = 0.1
"""A rival encoding within this coherence of the best one makes the detection a guess."""


def _choose_encoding(sample: bytes, at_eof: bool, config: ReadConfig) -> tuple[str, int]:
    """The encoding to read a text file in, and the length of its BOM, from its first
    bytes; refuses the file when it is binary or no encoding is a confident reading."""
    for bom, encoding in _BOMS:
        if sample.startswith(bom):
            return encoding, len(bom)
    nul_share = sample.count(0) / max(1, len(sample))
    if nul_share <= 0.1:  # UTF-16/32 text is a third to three quarters NULs
        decoded = codecs.getincrementaldecoder("utf-8")("replace").decode(sample, final=at_eof)
        invalid = decoded.count("\ufffd") - sample.count("\ufffd".encode())
        if invalid <= len(sample) // 1000:
            # UTF-8 with a few bad records (dropped one by one as read.invalid_utf8, as
            # are stray NULs as read.nul_bytes); Latin-1 or GB18030 text fails on most
            # of its non-ASCII characters.
            return "utf-8", 0
    try:
        from charset_normalizer import from_bytes
    except ImportError as exc:
        raise RuntimeError("detecting encodings needs charset-normalizer; "
                           "install lmforge[data-prep]") from exc
    matches = from_bytes(sample)
    best = matches.best()
    if best is None:
        reason = ReadReason.BINARY if nul_share > 0 else ReadReason.UNKNOWN_ENCODING
        raise _FileRefused(reason, "not UTF-8, and no text encoding fits")
    guess = f"best guess {best.encoding}, coherence {best.coherence:.2f}, chaos {best.chaos:.2f}"
    encoding = best.encoding.lower()
    if encoding.startswith(("utf_16", "utf_32")) and best.chaos <= config.encoding_max_chaos:
        return encoding, 0  # told by structure: the NULs of ASCII fall in a fixed column
    if nul_share > 0:
        raise _FileRefused(ReadReason.BINARY, f"NUL bytes and no UTF-16/32 reading ({guess})")
    if best.chaos > config.encoding_max_chaos or best.coherence < config.encoding_min_coherence:
        raise _FileRefused(ReadReason.UNKNOWN_ENCODING,
                           f"not UTF-8, and no confident reading ({guess}); convert it to UTF-8")
    # Single-byte code pages (cp1252, cp1257, latin-1...) often read equally well: a
    # near rival that decodes the bytes differently means we would be guessing.
    rivals = sorted({m.encoding for m in matches
                     if m.encoding != best.encoding and m.chaos <= config.encoding_max_chaos
                     and m.coherence >= best.coherence - _ENCODING_MARGIN
                     and str(m) != str(best)})
    if rivals:
        raise _FileRefused(ReadReason.UNKNOWN_ENCODING,
                           f"not UTF-8, and {best.encoding} or {', '.join(rivals)} would read it "
                           f"differently ({guess}); convert it to UTF-8")
    return "gb18030" if encoding in _GB_FAMILY else encoding, 0


def _text_stream(expanded: _Expanded, config: ReadConfig) -> io.BufferedReader:
    """UTF-8 bytes of a text file, whatever it was stored in."""
    sample, at_eof = expanded.sample(_SNIFF_BYTES)
    encoding, bom = _choose_encoding(sample, at_eof, config)
    expanded.skip(bom)
    if encoding != "utf-8":
        expanded.transcode_from(encoding)
    return io.BufferedReader(expanded, _BUFFER_BYTES)


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


# --- records out -----------------------------------------------------------------------


def _meta_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | int | float | list | dict):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _record_id(value: Any) -> str:
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    return ""


@dataclass(slots=True)
class _FileReading:
    """One file being read: numbers its records and reports the dropped ones."""

    file: SourceFile
    log: DecisionLog
    config: ReadConfig
    records: int = 0
    kept: int = 0

    def next_id(self) -> str:
        self.records += 1
        return f"{self.file.url}#{self.records - 1}"

    def drop(self, doc_id: str, reason: ReadReason, detail: str = "") -> None:
        self.log.drop(doc_id, STAGE, reason.value, detail=detail)

    def document(self, fallback_id: str, text: str, record_id: Any = None,
                 meta: dict[str, str] | None = None) -> Document | None:
        """The Document, or None (dropped) when its text is too long or holds NULs."""
        if len(text) * 4 > self.config.max_record_bytes and \
                len(text.encode("utf-8", "surrogatepass")) > self.config.max_record_bytes:
            self.drop(fallback_id, ReadReason.OVERSIZED)
            return None
        if "\0" in text:
            self.drop(fallback_id, ReadReason.NUL_BYTES)
            return None
        self.kept += 1
        return Document(id=_record_id(record_id) or fallback_id, text=text, meta=meta or {},
                        source=self.file.url)


CHAT_FIELD = "messages"
"""A JSONL record with this list of {role, content} turns (and no text field) is a chat."""
PROMPT_FIELD, RESPONSE_FIELD = "prompt", "response"
"""... as is one with a prompt and a response: a user turn and the assistant's answer."""
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


def chat_messages(record: dict[str, Any]) -> list[dict[str, str]] | str:
    """A chat record's turns, taken out of `record`; or why it is malformed (a string).

    Only role and content are kept: the chat template renders those, and a field the
    filters and the PII scrub never saw must not reach the tokens.
    """
    if CHAT_FIELD in record:
        turns = record.pop(CHAT_FIELD)
        if not isinstance(turns, list) or not turns:
            return f"{CHAT_FIELD!r} is {type(turns).__name__}, not a non-empty list of turns"
    else:
        prompt, response = record.pop(PROMPT_FIELD), record.pop(RESPONSE_FIELD, None)
        if not isinstance(prompt, str) or not isinstance(response, str):
            return (f"{PROMPT_FIELD!r} and {RESPONSE_FIELD!r} must both be strings (got "
                    f"{type(prompt).__name__} and {type(response).__name__})")
        turns = [{"role": "user", "content": prompt},
                 {"role": "assistant", "content": response}]
    messages: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str) \
                or turn.get("role") not in CHAT_ROLES:
            return (f"turn {i} is not {{'role': one of {sorted(CHAT_ROLES)}, 'content': "
                    f"a string}}")
        messages.append({"role": turn["role"], "content": turn["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "no assistant turn with content: nothing to train on"
    return messages


def _read_jsonl(stream: BinaryIO, reading: _FileReading) -> Iterator[Document]:
    config = reading.config
    text_field, id_field = config.text_field, config.id_field
    for line in _bounded_lines(stream, config.max_record_bytes):
        if line is None:
            reading.drop(reading.next_id(), ReadReason.OVERSIZED)
            continue
        if not line.strip():
            continue
        doc_id = reading.next_id()
        if b"\0" in line:
            reading.drop(doc_id, ReadReason.NUL_BYTES)
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            reading.drop(doc_id, ReadReason.INVALID_UTF8)
            continue
        except ValueError:
            reading.drop(doc_id, ReadReason.MALFORMED_JSON)
            continue
        if not isinstance(record, dict):
            reading.drop(doc_id, ReadReason.NOT_AN_OBJECT, type(record).__name__)
            continue
        text = record.pop(text_field, None)
        own_id = record.pop(id_field, None)
        if text is None and (CHAT_FIELD in record or PROMPT_FIELD in record):
            messages = chat_messages(record)
            if isinstance(messages, str):
                reading.drop(_record_id(own_id) or doc_id, ReadReason.MALFORMED_CHAT, messages)
                continue
            meta = {str(k): _meta_value(v) for k, v in record.items()}
            if (doc := reading.document(doc_id, chat_text(messages), own_id, meta)) is not None:
                doc.messages = messages
                yield doc
            continue
        if not isinstance(text, str):
            reading.drop(_record_id(own_id) or doc_id, ReadReason.MISSING_TEXT,
                         f"{text_field!r} is {type(text).__name__}")
            continue
        meta = {str(k): _meta_value(v) for k, v in record.items()}
        if (doc := reading.document(doc_id, text, own_id, meta)) is not None:
            yield doc


def _read_text(stream: BinaryIO, reading: _FileReading) -> Iterator[Document]:
    """Plain text: documents are separated by blank lines or by a line holding only
    `%` (the fortune/strfile convention)."""
    max_bytes = reading.config.max_record_bytes
    lines: list[bytes] = []
    size = 0
    oversized = False
    for line in _with_end(_bounded_lines(stream, max_bytes)):
        separator = line is not None and (not line.strip() or line.strip() == b"%")
        if separator:
            if lines or oversized:
                doc_id = reading.next_id()
                if oversized:
                    reading.drop(doc_id, ReadReason.OVERSIZED)
                else:
                    try:
                        text = b"".join(lines).decode("utf-8")
                    except UnicodeDecodeError:
                        reading.drop(doc_id, ReadReason.INVALID_UTF8)
                    else:
                        if (doc := reading.document(doc_id, text)) is not None:
                            yield doc
            lines, size, oversized = [], 0, False
            continue
        size += max_bytes + 1 if line is None else len(line)
        if line is None or size > max_bytes:
            oversized, lines = True, []
        else:
            lines.append(line)


def _with_end(lines: Iterator[bytes | None]) -> Iterator[bytes | None]:
    yield from lines
    yield b""


class _CsvLines:
    """Decoded lines for the csv module, each at most the record cap, counting bytes so a
    row's size is known; an oversized line becomes an empty one (its row is then dropped
    by size)."""

    def __init__(self, stream: BinaryIO, max_bytes: int) -> None:
        self._lines = _bounded_lines(stream, max_bytes)
        self._max = max_bytes
        self.bytes = 0
        self.invalid = False
        """Whether a line since the flag was last cleared held bytes that are not UTF-8."""

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        if line is None:
            self.bytes += self._max + 1
            return "\n"
        self.bytes += len(line)
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            self.invalid = True
            return line.decode("utf-8", "surrogateescape")


def _read_csv(stream: BinaryIO, reading: _FileReading, delimiter: str) -> Iterator[Document]:
    config = reading.config
    # The module-wide limit is only ever raised, to the record cap: a longer field is
    # dropped by the cap, not refused by csv at its 128 KiB default.
    csv.field_size_limit(max(csv.field_size_limit(), config.max_record_bytes + 1))
    lines = _CsvLines(stream, config.max_record_bytes)
    rows = csv.reader(lines, delimiter=delimiter)
    header: list[str] | None = None
    text_at = id_at = -1
    consumed = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:
            # A field past the cap, or a row csv cannot parse: drop it and go on from the
            # next line (a quoted field with newlines may lose its tail as well).
            reason = (ReadReason.OVERSIZED if "field larger" in str(exc)
                      else ReadReason.MALFORMED_CSV)
            reading.drop(reading.next_id(), reason, str(exc))
            consumed, lines.invalid = lines.bytes, False
            rows = csv.reader(lines, delimiter=delimiter)
            continue
        size, consumed = lines.bytes - consumed, lines.bytes
        invalid, lines.invalid = lines.invalid, False
        if header is None:
            if not row:
                continue
            header = [name.strip() for name in row]
            if config.text_field not in header:
                raise DatasetInputError(
                    f"{reading.file.url!r} has no column {config.text_field!r} (columns: "
                    f"{', '.join(header)}); set the text field to the column holding the text")
            text_at = header.index(config.text_field)
            id_at = header.index(config.id_field) if config.id_field in header else -1
            continue
        if size > config.max_record_bytes:
            reading.drop(reading.next_id(), ReadReason.OVERSIZED)
            continue
        if not row:
            continue
        doc_id = reading.next_id()
        if invalid:
            reading.drop(doc_id, ReadReason.INVALID_UTF8)
            continue
        if text_at >= len(row):
            reading.drop(doc_id, ReadReason.MISSING_TEXT, f"row has {len(row)} fields")
            continue
        meta = {name: row[i] for i, name in enumerate(header)
                if i < len(row) and i not in (text_at, id_at)}
        own_id = row[id_at] if 0 <= id_at < len(row) else None
        if (doc := reading.document(doc_id, row[text_at], own_id, meta)) is not None:
            yield doc


def _is_text_type(pa: Any, kind: Any) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or pa.types.is_string_view(kind))


def _read_parquet(source: Any, reading: _FileReading) -> Iterator[Document]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise RuntimeError("reading Parquet needs pyarrow; install lmforge[data-prep]") from exc
    config, url = reading.config, reading.file.url
    try:
        # Buffered page reads instead of whole column chunks: reading a file of 64k-row
        # groups (21 MB of text each) peaked 41 MB over the baseline instead of 101 MB.
        parquet = pq.ParquetFile(source, buffer_size=_BUFFER_BYTES, pre_buffer=False)
    except pa.ArrowInvalid as exc:
        raise _FileRefused(ReadReason.CORRUPT_FILE, f"not Parquet: {exc}") from exc
    schema = parquet.schema_arrow
    if schema.get_field_index(config.text_field) < 0:
        raise DatasetInputError(
            f"{url!r} has no column {config.text_field!r} (columns: {', '.join(schema.names)}); "
            "set the text field to the column holding the text")
    kind = schema.field(config.text_field).type
    if not _is_text_type(pa, kind):
        raise DatasetInputError(
            f"column {config.text_field!r} of {url!r} is {kind}, not a string; "
            "set the text field to a string column")
    with contextlib.closing(parquet):
        for batch in parquet.iter_batches(batch_size=config.parquet_batch_rows,
                                          use_threads=False):
            columns = {name: batch.column(i).to_pylist()
                       for i, name in enumerate(batch.schema.names)}
            texts = columns.pop(config.text_field)
            ids = columns.pop(config.id_field, None)
            for row, text in enumerate(texts):
                doc_id = reading.next_id()
                if not isinstance(text, str):
                    reading.drop(doc_id, ReadReason.MISSING_TEXT, "null")
                    continue
                meta = {name: _meta_value(values[row]) for name, values in columns.items()}
                own_id = ids[row] if ids is not None else None
                if (doc := reading.document(doc_id, text, own_id, meta)) is not None:
                    yield doc


# --- the dataset -----------------------------------------------------------------------


@contextlib.contextmanager
def _open_stored(file: SourceFile, s3: Any, config: ReadConfig) -> Iterator[IO[bytes]]:
    """The file's stored bytes; access errors become DatasetInputError naming the file."""
    if file.url.startswith("s3://"):
        with _s3_errors(file.url), s3.open(file.url[len("s3://"):], "rb",
                                           block_size=config.s3_block_bytes,
                                           cache_type="readahead") as f:
            yield f
        return
    try:
        f = open(file.url, "rb", buffering=0)  # noqa: SIM115 - closed below, errors mapped
    except FileNotFoundError as exc:
        raise DatasetInputError(f"dataset path {file.url!r} does not exist (it went away "
                                "while the dataset was read)") from exc
    except PermissionError as exc:
        raise DatasetInputError(f"dataset path {file.url!r} cannot be read ({exc}); "
                                "check its permissions") from exc
    with f:
        before = _file_identity(f, file.url)
        yield f
        after = _file_identity(f, file.url)
        if after != before:
            raise DatasetInputError(
                f"dataset path {file.url!r} changed while it was read (size {before[0]} -> "
                f"{after[0]} bytes, mtime_ns {before[1]} -> {after[1]}); the run would train "
                "on a mix of two versions. Run it again once nothing writes to the file")


def _file_identity(f: IO[bytes], path: str) -> tuple[int, int, int]:
    """Size and modification time of the open file, and the inode its path names now
    (a file replaced by a rename keeps the open one unchanged)."""
    opened = os.fstat(f.fileno())
    try:
        inode = os.stat(path).st_ino
    except OSError:
        inode = -1
    return opened.st_size, opened.st_mtime_ns, inode if inode == opened.st_ino else -inode


def _spooled_parquet(stored: IO[bytes], file: SourceFile, config: ReadConfig,
                     spool_dir: Path | None) -> Iterator[Path]:
    """A compressed Parquet file, expanded into `spool_dir` (Parquet needs random access)."""
    if spool_dir is None:
        raise DatasetInputError(
            f"{file.url!r} is compressed Parquet, which is read from a decompressed copy, "
            "and no work directory was given for it; store the Parquet uncompressed "
            "(its pages are compressed already)")
    expanded = _decompressed(stored, file.compression, config)
    handle, name = tempfile.mkstemp(prefix=".read-", suffix=".parquet", dir=spool_dir)
    try:
        with os.fdopen(handle, "wb") as out:
            while chunk := expanded.read(_BUFFER_BYTES):
                out.write(chunk)
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def _read_file(file: SourceFile, s3: Any, log: DecisionLog, config: ReadConfig,
               spool_dir: Path | None) -> Iterator[Document]:
    reading = _FileReading(file, log, config)
    try:
        if not file.format:
            raise _FileRefused(ReadReason.UNKNOWN_FORMAT,
                               "the name tells no format; give the format or rename the file")
        with _open_stored(file, s3, config) as stored:
            if file.format == "parquet":
                if file.compression:
                    for path in _spooled_parquet(stored, file, config, spool_dir):
                        yield from _read_parquet(str(path), reading)
                else:
                    yield from _read_parquet(stored if s3 is not None and file.url.startswith(
                        "s3://") else file.url, reading)
                return
            stream = _text_stream(_decompressed(stored, file.compression, config), config)
            if file.format == "jsonl":
                yield from _read_jsonl(stream, reading)
            elif file.format == "text":
                yield from _read_text(stream, reading)
            else:
                yield from _read_csv(stream, reading, "\t" if file.format == "tsv" else ",")
    except _FileRefused as refusal:
        log.drop(file.url, STAGE, refusal.reason.value, detail=refusal.detail)
    finally:
        log.count(STAGE, "files")
        log.count(STAGE, "records", reading.records)
        log.count(STAGE, "bytes", file.size)


def iter_documents(specs: str | Sequence[str], *,
                   roots: Iterable[str | os.PathLike[str]] | DataRoots,
                   log: DecisionLog, config: ReadConfig | None = None,
                   spool_dir: Path | None = None) -> Iterator[Document]:
    """Every document of the dataset `specs` names, streamed in a stable order.

    Bad records and files are dropped into `log` (stage "read", `ReadReason` codes);
    the tallies `("read", "files")`, `("read", "records")` (seen, kept or not) and
    `("read", "bytes")` (as stored) are counted there too. Raises DatasetInputError
    for a problem with the dataset itself, naming the path or URL and the cause.
    `spool_dir` (the run's work directory) takes the decompressed copy of a
    compressed Parquet file while it is read; nothing else is written.
    """
    config = config or ReadConfig()
    needs_s3 = any(urlparse(s).scheme == "s3"
                   for s in ([specs] if isinstance(specs, str) else specs))
    s3 = _s3_filesystem(config) if needs_s3 else None
    for file in list_dataset_files(specs, roots, config=config, s3=s3):
        yield from _read_file(file, s3, log, config, spool_dir)


def dataset_digest(files: Sequence[SourceFile], *, config: ReadConfig | None = None) -> str:
    """sha256 over the stored bytes of `files` in order (each length-prefixed): the same
    contents under other names give the same digest. Reads everything once."""
    config = config or ReadConfig()
    s3 = _s3_filesystem(config) if any(f.url.startswith("s3://") for f in files) else None
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.size}\n".encode())
        with _open_stored(file, s3, config) as stored:
            while block := stored.read(_BUFFER_BYTES):
                digest.update(block)
    return digest.hexdigest()
