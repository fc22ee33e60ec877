"""cost-autoscaler answers each tenant's reads: its runs' events and its cost entries.

A tenant's client credential may not read the event stream or the ledger bucket (both
hold every tenant's runs); it asks on `lmforge.query.<kind>.<tenant>`, a subject the
nats-server lets it publish for its own tenant only (`lmforge.contracts.tenant_queries`).
This service already reads every run's events and owns the ledger, so it answers.

Which tenant an event belongs to is decided as the pipeline decides it: the subject
token for dataset.ready (the server checked it against the publisher's credential; a
tenant header the publisher wrote counts for nothing), the `Lmforge-Tenant` header
for every later event (only services publish those, and they carry the run's tenant
on from dataset.ready).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from lmforge.contracts import subjects
from lmforge.contracts.names import Header, ServiceName
from lmforge.contracts.tenant_queries import (
    COST,
    PAGE_BYTES,
    PREFIX,
    EventsPage,
    EventsRequest,
    QueriedEvent,
    parse_query_subject,
)
from lmforge.dispatch import KeyValue
from services.cost_autoscaler.ledger import SERVING_KEY

log = logging.getLogger("lmforge.autoscaler.queries")

PAGE_SECONDS = 2.0
"""Scanning time per page at most: a sparse tenant in a long stream gets partial pages
(`end` false) rather than a request that outlives the client's timeout."""


def event_tenant(msg: Msg) -> str | None:
    """The tenant of a message in the stream (None: not a catalog subject)."""
    try:
        subject = subjects.by_name(msg.subject)
    except KeyError:
        return None
    if subject.tenant_scoped:
        return subject.tenant_of(msg.subject)
    return (msg.headers or {}).get(Header.TENANT, "")


def encoded_size(event: QueriedEvent) -> int:
    """About what `event` adds to its page's JSON: base64 data, subject, numbers, keys."""
    return (len(event.data) + 2) // 3 * 4 + len(event.subject) + len(event.cached_from) + 96


def tenant_ledger(entries: dict[str, dict[str, Any]], tenant: str) -> dict[str, dict[str, Any]]:
    """The ledger entries of `tenant`'s runs (an entry keeps its run's tenant)."""
    return {run_id: entry for run_id, entry in entries.items()
            if run_id != SERVING_KEY and entry.get("tenant", "") == tenant}


class TenantQueries:
    """Subscribes to every tenant's query subjects (one answer per request across the
    replicas: a queue group) and answers from the stream and the ledger."""

    def __init__(self, nc: Client, js: JetStreamContext, ledger: KeyValue) -> None:
        self.nc, self.js, self.ledger = nc, js, ledger
        self._sub: Subscription | None = None
        self._answering: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{PREFIX}.*.*", queue=ServiceName.COST_AUTOSCALER,
                                            cb=self._on_request)
        log.info("answering tenant queries on %s.*.*", PREFIX)

    async def _on_request(self, msg: Msg) -> None:
        task = asyncio.create_task(self._answer(msg))  # a long page does not hold the rest
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            kind, tenant = parse_query_subject(msg.subject)
        except ValueError as exc:
            await msg.respond(json.dumps({"error": str(exc)}).encode())
            return
        try:
            if kind == COST:
                reply = json.dumps(await self.cost(tenant)).encode()
            else:
                reply = (await self.events_page(tenant, EventsRequest.decode(msg.data))).encode()
        except (ValueError, nats.errors.Error) as exc:
            log.warning("query %s of tenant %s not answered: %s", kind, tenant, exc)
            reply = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
        try:
            await msg.respond(reply)
        except nats.errors.Error as exc:  # the asker times out; this says why
            log.warning("answer to %s (%d bytes) not sent: %s", msg.subject, len(reply), exc)

    async def cost(self, tenant: str) -> dict[str, Any]:
        entries: dict[str, dict[str, Any]] = {}
        serving: dict[str, Any] = {}
        for key in await self.ledger.keys():
            raw = await self.ledger.get(key)
            if raw is None:
                continue
            if key == SERVING_KEY:
                serving = json.loads(raw)
            else:
                entries[key] = json.loads(raw)
        return {"runs": tenant_ledger(entries, tenant), "serving": serving}

    async def events_page(self, tenant: str, request: EventsRequest) -> EventsPage:
        """`tenant`'s events from `request.from_seq` up to what the stream held when asked,
        or as many as fit in one page."""
        info = await self.js.stream_info(subjects.STREAM)
        last = info.state.last_seq
        if request.from_seq > last or not info.state.messages:
            return EventsPage(next_seq=request.from_seq, end=True)
        page = EventsPage(next_seq=request.from_seq, end=False)
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                opt_start_seq=request.from_seq)
        sub = await self.js.subscribe("lmforge.>", ordered_consumer=True,
                                      stream=subjects.STREAM, config=config)
        size, deadline = 0, time.monotonic() + PAGE_SECONDS
        budget = min(PAGE_BYTES, self.nc.max_payload // 2)  # the server's limit, not ours
        try:
            while size < budget and time.monotonic() < deadline:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except nats.errors.TimeoutError:
                    page.end = True  # nothing more came: the stream ends before `last`
                    break
                seq = msg.metadata.sequence.stream
                page.next_seq = seq + 1
                headers = msg.headers or {}
                if (event_tenant(msg) == tenant
                        and (not request.run_id or headers.get(Header.RUN_ID) == request.run_id)):
                    ts = msg.metadata.timestamp.timestamp() if msg.metadata.timestamp else 0.0
                    page.events.append(QueriedEvent(
                        seq=seq, subject=msg.subject, data=msg.data, time=ts,
                        cached_from=headers.get(Header.CACHED_FROM, "")))
                    size += encoded_size(page.events[-1])
                if seq >= last:
                    page.end = True
                    break
        finally:
            await sub.unsubscribe()
        return page
