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
until `end`, and, to follow, keeps asking. Cost entries come back in pages too, by
run id (`after`), since a tenant's many runs do not fit in one reply.

The responder answers a few requests of one tenant at a time: more at once are
answered `busy` (`BUSY`) at once, and the client asks again shortly. A request body
it cannot read (not a JSON object of the fields below, or over `MAX_REQUEST_BYTES`)
is answered with an error saying why.
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

MAX_REQUEST_BYTES = 1024
"""A request body's bytes at most (a sequence and a run id)."""
BUSY = "busy"
"""The error of a request refused because its tenant has as many in flight as allowed."""

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


def _request_fields(data: bytes, fields: dict[str, type]) -> dict[str, Any]:
    """The fields of a request body (absent ones left out): ValueError, saying what is
    wrong, for a body too large, not JSON, not an object or with a field of another type."""
    if len(data) > MAX_REQUEST_BYTES:
        raise ValueError(f"request of {len(data)} bytes; at most {MAX_REQUEST_BYTES}")
    try:
        raw = json.loads(data or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"request is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"request is a JSON {type(raw).__name__}, not an object")
    found: dict[str, Any] = {}
    for name, kind in fields.items():
        if name not in raw:
            continue
        value = raw[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"request field {name!r} must be a JSON "
                             f"{'integer' if kind is int else 'string'}, not {value!r:.40}")
        found[name] = value
    return found


@dataclass(frozen=True)
class EventsRequest:
    from_seq: int = 1
    run_id: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> EventsRequest:
        """ValueError for a body that is not one (`_request_fields`)."""
        raw = _request_fields(data, {"from_seq": int, "run_id": str})
        return cls(from_seq=max(1, raw.get("from_seq", 1)), run_id=raw.get("run_id", ""))


@dataclass(frozen=True)
class CostRequest:
    after: str = ""
    """The entries of run ids after this one (''; from the first)."""

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> CostRequest:
        """ValueError for a body that is not one (`_request_fields`)."""
        return cls(after=_request_fields(data, {"after": str}).get("after", ""))


@dataclass(frozen=True)
class QueriedEvent:
    """One event of the stream as the tenant may see it."""

    seq: int
    subject: str
    data: bytes
    time: float
    cached_from: str = ""
    omitted_bytes: int = 0
    """The event's data was this large, more than one reply holds: it is left out
    (`data` empty), so the events after it still come."""

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "data": base64.b64encode(self.data).decode()}


def json_size(value: object) -> int:
    """Bytes of `value` as `json.dumps` writes it (ASCII: as many bytes as characters)."""
    return len(json.dumps(value))


PAGE_OVERHEAD = 256
"""Bytes of a page's reply besides its items, at most (keys, next_seq, end, error)."""


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
            "events": [e.as_json() for e in self.events],
            "next_seq": self.next_seq, "end": self.end, "error": self.error}).encode()

    @classmethod
    def decode(cls, data: bytes) -> EventsPage:
        raw: dict[str, Any] = json.loads(data)
        return cls(events=[QueriedEvent(seq=int(e["seq"]), subject=str(e["subject"]),
                                        data=base64.b64decode(e["data"]),
                                        time=float(e["time"]),
                                        cached_from=str(e.get("cached_from", "")),
                                        omitted_bytes=int(e.get("omitted_bytes", 0)))
                           for e in raw.get("events", [])],
                   next_seq=int(raw.get("next_seq", 1)), end=bool(raw.get("end", True)),
                   error=str(raw.get("error", "")))


@dataclass
class CostPage:
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Ledger entry per run id of the tenant's, in run id order."""
    serving: dict[str, Any] = field(default_factory=dict)
    """The deployment's serving entry (shared: its totals are every tenant's), with
    `tokens_by_model` holding the asking tenant's models only; on the first page."""
    next_after: str = ""
    """Where the next request starts (`CostRequest.after`)."""
    end: bool = True
    error: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> CostPage:
        raw: dict[str, Any] = json.loads(data)
        return cls(runs=dict(raw.get("runs") or {}), serving=dict(raw.get("serving") or {}),
                   next_after=str(raw.get("next_after", "")), end=bool(raw.get("end", True)),
                   error=str(raw.get("error", "")))
