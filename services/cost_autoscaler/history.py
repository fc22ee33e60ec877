"""The gateway's load history in 5-minute buckets, kept in a JetStream KV bucket.

The forecast needs days of history; an autoscaler restart must not throw them
away. Each finished bucket is one key (`gateway.<bucket number>`, the bucket
number being unix seconds // 300) in `lmforge_load_history`, written once when
the bucket closes, read back in full at start. Buckets older than the history
kept are deleted as new ones close. A bucket with no reading (the autoscaler
was down, the scrape failed) is a gap: the series handed to the forecast fills
it by linear interpolation, and says how many it filled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import numpy as np

from lmforge.dispatch import KeyValue
from services.cost_autoscaler.forecasting import BUCKET_S, DAY_BUCKETS

log = logging.getLogger("lmforge.autoscaler")

KEY_PREFIX = "gateway."


@dataclass(slots=True)
class BucketLoad:
    """The gateway's load over one 5-minute bucket."""

    requests_per_s: float = 0.0
    """Mean of the readings in the bucket."""
    peak_requests_per_s: float = 0.0
    backlog: float = 0.0
    """Mean requests in flight or queued."""
    samples: int = 0

    def add(self, rps: float, backlog: float) -> None:
        n = self.samples
        self.requests_per_s = (self.requests_per_s * n + rps) / (n + 1)
        self.backlog = (self.backlog * n + backlog) / (n + 1)
        self.peak_requests_per_s = max(self.peak_requests_per_s, rps)
        self.samples = n + 1


@dataclass
class LoadHistory:
    """Finished buckets by number, and the bucket being filled."""

    keep_days: float = 28.0
    buckets: dict[int, BucketLoad] | None = None
    open_bucket: int | None = None
    open_load: BucketLoad | None = None

    def __post_init__(self) -> None:
        self.buckets = self.buckets or {}

    def add(self, now_s: float, rps: float, backlog: float) -> list[int]:
        """Take in one reading; returns the buckets this reading closed (0 or 1)."""
        bucket = int(now_s // BUCKET_S)
        closed: list[int] = []
        if self.open_bucket is not None and bucket != self.open_bucket and self.open_load:
            self.finished[self.open_bucket] = self.open_load
            closed.append(self.open_bucket)
        if bucket != self.open_bucket:
            self.open_bucket, self.open_load = bucket, BucketLoad()
        assert self.open_load is not None
        self.open_load.add(rps, backlog)
        return closed

    @property
    def finished(self) -> dict[int, BucketLoad]:
        assert self.buckets is not None
        return self.buckets

    def newest(self) -> int | None:
        return max(self.finished) if self.finished else None

    def series(self) -> tuple[list[float], int, int]:
        """(mean request rate per bucket from the oldest kept to the newest, gaps filled by
        interpolation; the newest bucket's number; how many buckets were gaps)."""
        newest = self.newest()
        if newest is None:
            return [], -1, 0
        oldest = max(min(self.finished), newest - int(self.keep_days * DAY_BUCKETS) + 1)
        numbers = np.arange(oldest, newest + 1)
        known = np.array([b for b in numbers if b in self.finished])
        values = np.array([self.finished[int(b)].requests_per_s for b in known])
        filled = np.interp(numbers, known, values)
        return filled.tolist(), newest, len(numbers) - len(known)

    def expired(self) -> list[int]:
        """Buckets older than the history kept (to delete)."""
        newest = self.newest()
        if newest is None:
            return []
        cutoff = newest - int(self.keep_days * DAY_BUCKETS)
        return [b for b in self.finished if b <= cutoff]


class LoadHistoryStore:
    """LoadHistory's finished buckets in a key-value bucket."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def save(self, history: LoadHistory, bucket: int) -> None:
        load = history.finished[bucket]
        await self.kv.put(f"{KEY_PREFIX}{bucket}", json.dumps(asdict(load)).encode())
        for old in history.expired():
            del history.finished[old]
            await self.kv.delete(f"{KEY_PREFIX}{old}")

    async def load(self, history: LoadHistory) -> int:
        """Read every stored bucket into `history`; returns how many."""
        count = 0
        for key in await self.kv.keys():
            if not key.startswith(KEY_PREFIX):
                continue
            raw = await self.kv.get(key)
            if raw is None:
                continue
            try:
                history.finished[int(key.removeprefix(KEY_PREFIX))] = BucketLoad(
                    **json.loads(raw))
                count += 1
            except (ValueError, TypeError) as exc:
                log.warning("load history %s unreadable, skipped: %s", key, exc)
        return count


def seconds_of(bucket: int) -> float:
    """When bucket number `bucket` starts (unix seconds)."""
    return float(bucket * BUCKET_S)
