"""Embedding vectors (and MinHash signatures) kept on disk, not in memory: appended
once, read back in slices or by row.

The semantic stage embeds every chunk of the corpus (1.9M chunks for 1 GB of
text, 1.5 KB each as float32 at 384 dims): held in memory, with the copies that
concatenating and subsetting make, they were most of the pipeline's 11 GB peak.
A `VectorSpool` appends each embedded batch to an anonymous temporary file (in
the run's spool directory; the file has no name, so it disappears with the
process whatever happens) and gives rows back by slice or by index.

Reads are plain file reads into a fresh array (`readinto`), never a mapping:
file pages a process maps count in its RSS until the kernel wants them back,
and the kernel maps up to 64 KiB around each page a random read faults in, so
reading a k-means sample of 4,096 rows through `np.memmap` put 190 MB of a
180 MB file in the peak RSS. Only the rows asked for are ever in memory; the
file itself stays in the page cache, which the kernel reclaims as it needs.

`ArrayRows` gives an in-memory array the same interface, for callers (tests,
benchmarks) that have their vectors already. Rows are float32 unless a spool is
made with another dtype (near-dup spools its uint32 signatures the same way).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

Rows = npt.NDArray[Any]
BATCH_ROWS = 16_384
"""Rows per slice when streaming (24 MiB at 384 float32 dims)."""


class VectorRows(Protocol):
    """Rows of vectors, read a slice or a set of rows at a time."""

    dim: int

    def __len__(self) -> int: ...

    def rows(self, start: int, stop: int) -> Rows: ...

    def take(self, indices: npt.NDArray[np.int64]) -> Rows: ...


def batches(vectors: VectorRows, size: int = BATCH_ROWS) -> Iterator[tuple[int, Rows]]:
    """(first row, rows) slices of `vectors`, in order."""
    for start in range(0, len(vectors), size):
        yield start, vectors.rows(start, min(start + size, len(vectors)))


class ArrayRows:
    """An in-memory array as `VectorRows` (float32 unless `dtype` says otherwise)."""

    def __init__(self, array: npt.ArrayLike, dtype: npt.DTypeLike = np.float32) -> None:
        self.array: Rows = np.ascontiguousarray(array, dtype=dtype)
        if self.array.ndim != 2:
            raise ValueError(f"vectors must be 2-D, not of shape {self.array.shape}")
        self.dim = int(self.array.shape[1])

    def __len__(self) -> int:
        return len(self.array)

    def rows(self, start: int, stop: int) -> Rows:
        return self.array[start:stop]

    def take(self, indices: npt.NDArray[np.int64]) -> Rows:
        return self.array[np.asarray(indices, dtype=np.int64)]


def as_rows(vectors: VectorRows | np.ndarray) -> VectorRows:
    """`vectors` as `VectorRows` (an array is wrapped, not copied when already float32)."""
    return ArrayRows(vectors) if isinstance(vectors, np.ndarray) else vectors


class VectorSpool:
    """Rows of `dim` values (float32 unless `dtype` says otherwise) in an unnamed
    temporary file under `directory`."""

    def __init__(self, dim: int, directory: Path | None = None,
                 dtype: npt.DTypeLike = np.float32) -> None:
        self.dim = dim
        self.dtype = np.dtype(dtype)
        # Closed by close(), or with the object: unnamed, it leaves nothing behind.
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115
        self._count = 0
        self._row_bytes = self.dtype.itemsize * dim

    def __len__(self) -> int:
        return self._count

    def append(self, rows: npt.ArrayLike) -> None:
        array = np.ascontiguousarray(rows, dtype=self.dtype)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise ValueError(f"rows of shape {array.shape} for a spool of {self.dim} dims")
        self._file.seek(0, 2)
        self._file.write(array.tobytes())
        self._count += len(array)

    def rows(self, start: int, stop: int) -> Rows:
        """A copy of rows [start, stop)."""
        stop = min(stop, self._count)
        if stop <= start:
            return np.zeros((0, self.dim), dtype=self.dtype)
        out = np.empty((stop - start, self.dim), dtype=self.dtype)
        self._file.seek(start * self._row_bytes)
        read = self._file.readinto(out.data.cast("B"))
        if read != out.nbytes:
            raise OSError(f"vector spool: read {read} of {out.nbytes} bytes")
        return out

    def take(self, indices: npt.NDArray[np.int64]) -> Rows:
        """A copy of the rows at `indices` (any order, repeats allowed)."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.dim), dtype=self.dtype)
        if not len(indices):
            return out
        if indices.min() < 0 or indices.max() >= self._count:
            raise IndexError(f"row index out of range for a spool of {self._count} rows")
        # In file order, one read per run of consecutive rows.
        order = np.argsort(indices, kind="stable")
        wanted = indices[order]
        cuts = np.flatnonzero(np.diff(wanted) != 1) + 1
        for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(wanted)], strict=True):
            first = int(wanted[lo])
            out[order[lo:hi]] = self.rows(first, first + hi - lo)
        return out

    def close(self) -> None:
        self._file.close()
