"""A tenant's read of the pipeline: request/reply on `lmforge.query.<kind>.<tenant>`.

Why queries and not a read of the stream: a tenant's client credential may not read
the event stream or the cost ledger (the nats-server refuses it, `nats_roles`), since
both hold every tenant's runs. It may publish only on its own tenant's query
subjects; cost-autoscaler answers them (`services/cost_autoscaler/tenant_queries.py`)
with that tenant's events and ledger entries and nothing else. The tenant is the
subject's last token, which the server checked against the credential: a body
cannot ask for another tenant.

Events come back in pages, one reply per request (the responder's permission to
answer is one reply per request received): the client asks again from `next_seq`
until `end`, and, to follow, keeps asking.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from lmforge.contracts.subjects import NO_TENANT, TENANT_PATTERN

PREFIX = "lmforge.query"
EVENTS = "events"
"""The tenant's events in the stream, from a sequence on, optionally one run's."""
COST = "cost"
"""The tenant's cost-ledger entries, and the serving entry (one deployment's, shared)."""
KINDS: tuple[str, ...] = (EVENTS, COST)

PAGE_BYTES = 1 << 20
"""Encoded bytes per reply at most, and half the server's max_payload at most (1 MiB by
default, 8 MiB as `lmforge up` configures it)."""


def query_subject(kind: str, tenant: str) -> str:
    """The subject of `tenant`'s `kind` query ('': a credential from before tenants,
    whose runs have none, asks on the no-tenant token as it publishes on it)."""
    if kind not in KINDS:
        raise ValueError(f"unknown query {kind!r}; known: {', '.join(KINDS)}")
    if tenant and not TENANT_PATTERN.match(tenant):
        raise ValueError(f"tenant {tenant!r} must be 1-63 of a-z, 0-9, '-' and '_', "
                         f"starting with a letter or digit")
    return f"{PREFIX}.{kind}.{tenant or NO_TENANT}"


def parse_query_subject(subject: str) -> tuple[str, str]:
    """(kind, tenant) of a query subject; ValueError for anything else."""
    prefix, _, token = subject.rpartition(".")
    head, _, kind = prefix.rpartition(".")
    if head != PREFIX or kind not in KINDS or not (token == NO_TENANT
                                                   or TENANT_PATTERN.match(token)):
        raise ValueError(f"{subject!r} is not {PREFIX}.<{'|'.join(KINDS)}>.<tenant>")
    return kind, "" if token == NO_TENANT else token


@dataclass(frozen=True)
class EventsRequest:
    from_seq: int = 1
    run_id: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> EventsRequest:
        raw = json.loads(data or b"{}")
        return cls(from_seq=max(1, int(raw.get("from_seq", 1))), run_id=str(raw.get("run_id", "")))


@dataclass(frozen=True)
class QueriedEvent:
    """One event of the stream as the tenant may see it."""

    seq: int
    subject: str
    data: bytes
    time: float
    cached_from: str = ""


@dataclass
class EventsPage:
    events: list[QueriedEvent] = field(default_factory=list)
    next_seq: int = 1
    """Where the next request starts."""
    end: bool = True
    """Nothing after `next_seq` was in the stream when the page was read."""
    error: str = ""

    def encode(self) -> bytes:
        return json.dumps({
            "events": [{**asdict(e), "data": base64.b64encode(e.data).decode()}
                       for e in self.events],
            "next_seq": self.next_seq, "end": self.end, "error": self.error}).encode()

    @classmethod
    def decode(cls, data: bytes) -> EventsPage:
        raw: dict[str, Any] = json.loads(data)
        return cls(events=[QueriedEvent(seq=int(e["seq"]), subject=str(e["subject"]),
                                        data=base64.b64decode(e["data"]),
                                        time=float(e["time"]),
                                        cached_from=str(e.get("cached_from", "")))
                           for e in raw.get("events", [])],
                   next_seq=int(raw.get("next_seq", 1)), end=bool(raw.get("end", True)),
                   error=str(raw.get("error", "")))
