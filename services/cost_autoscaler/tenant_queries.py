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

What a tenant may cost the service is bounded (`query_admission`): a few queries in
hand per tenant, more answered `busy`; a request body of at most a few hundred bytes;
a reply of at most a page (`PAGE_BYTES`, and half the server's max_payload), checked
before an item goes in, so a reply is never too large to send. Any failure to answer
is answered too, with the reason: the asker never waits out its timeout for nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import replace
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
    BUSY,
    COST,
    PAGE_BYTES,
    PAGE_OVERHEAD,
    PREFIX,
    CostPage,
    CostRequest,
    EventsPage,
    EventsRequest,
    QueriedEvent,
    json_size,
    parse_query_subject,
)
from lmforge.dispatch import KeyValue
from services.cost_autoscaler.ledger import SERVING_KEY
from services.cost_autoscaler.query_admission import QueryAdmission

log = logging.getLogger("lmforge.autoscaler.queries")

PAGE_SECONDS = 2.0
"""Scanning time per page at most: a sparse tenant in a long stream gets partial pages
(`end` false) rather than a request that outlives the client's timeout."""
READ_TIMEOUT_S = 1.0
"""How long a page waits for the stream's next event before it is sent as it is (not
as the end: the client asks again from where it stopped)."""
PER_TENANT = 2
"""Queries of one tenant in hand at most; more are answered `busy`."""
AT_ONCE = 8
"""Queries worked on at once, every tenant's (the rest of those admitted wait)."""
LEDGER_TTL_S = 1.0
"""A ledger read answers the cost queries of this long: tenants asking together, or
one tenant's pages, cost one read of every key."""
STOP_GRACE_S = 5.0
"""How long `stop` lets the answers in hand finish (a page scans ~3 s at most)."""


def event_tenant(msg: Msg) -> str | None:
    """The tenant of a message in the stream (None: not a catalog subject)."""
    try:
        subject = subjects.by_name(msg.subject)
    except KeyError:
        return None
    if subject.tenant_scoped:
        return subject.tenant_of(msg.subject)
    return (msg.headers or {}).get(Header.TENANT, "")


def page_item_size(item: object) -> int:
    """What one item adds to its page's JSON: itself and the ', ' after it."""
    return json_size(item) + 2


def tenant_ledger(entries: dict[str, dict[str, Any]], tenant: str) -> dict[str, dict[str, Any]]:
    """The ledger entries of `tenant`'s runs (an entry keeps its run's tenant)."""
    return {run_id: entry for run_id, entry in entries.items()
            if run_id != SERVING_KEY and entry.get("tenant", "") == tenant}


def tenant_serving(serving: dict[str, Any], entries: dict[str, dict[str, Any]],
                   tenant: str) -> dict[str, Any]:
    """The serving entry as `tenant` sees it: the deployment's totals (replica-hours, cost,
    tokens: shared by every tenant's models), and the tokens of its own models only. A
    model is its own when every ledger entry naming the model is one of its runs: a name
    that another tenant's run also uses is no one's here, so naming a run after another
    tenant's model does not show that model's tokens."""
    if not serving:
        return {}
    owners: dict[str, set[str]] = {}
    for entry in entries.values():
        owners.setdefault(str(entry.get("model_name", "")), set()).add(
            str(entry.get("tenant", "")))
    tokens = serving.get("tokens_by_model") or {}
    return {**serving, "tokens_by_model": {model: count for model, count in tokens.items()
                                           if owners.get(model) == {tenant}}}


class TenantQueries:
    """Subscribes to every tenant's query subjects (one answer per request across the
    replicas: a queue group) and answers from the stream and the ledger."""

    def __init__(self, nc: Client, js: JetStreamContext, ledger: KeyValue, *,
                 per_tenant: int = PER_TENANT, at_once: int = AT_ONCE,
                 read_timeout_s: float = READ_TIMEOUT_S) -> None:
        self.nc, self.js, self.ledger = nc, js, ledger
        self.admission = QueryAdmission(per_tenant=per_tenant, at_once=at_once)
        self.read_timeout_s = read_timeout_s
        self._sub: Subscription | None = None
        self._answering: set[asyncio.Task[None]] = set()
        self._ledger_lock = asyncio.Lock()
        self._ledger_read: tuple[float, dict[str, dict[str, Any]], dict[str, Any]] | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{PREFIX}.*.*", queue=ServiceName.COST_AUTOSCALER,
                                            cb=self._on_request)
        log.info("answering tenant queries on %s.*.*", PREFIX)

    async def stop(self, *, grace_s: float = STOP_GRACE_S) -> None:
        """Take no more queries; let the answers in hand finish (up to `grace_s`), then
        cancel the rest: a stopping service neither leaves tasks behind nor cuts off
        the answers it can still give."""
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None
        if not self._answering:
            return
        _done, late = await asyncio.wait(set(self._answering), timeout=grace_s)
        for task in late:
            task.cancel()
        if late:
            log.warning("stopping: %d tenant queries cancelled after %.0fs", len(late), grace_s)
            await asyncio.gather(*late, return_exceptions=True)

    async def _on_request(self, msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            kind, tenant = parse_query_subject(msg.subject)
        except ValueError as exc:
            await self._respond(msg, json.dumps({"error": str(exc)}).encode())
            return
        if not self.admission.admit(tenant):
            await self._respond(msg, json.dumps({"error": (
                f"{BUSY}: {self.admission.in_hand(tenant)} queries of tenant {tenant!r} in "
                f"hand, at most {self.admission.per_tenant}; ask again shortly")}).encode())
            return
        task = asyncio.create_task(self._answer(msg, kind, tenant))  # a long page does not
        self._answering.add(task)                                    # hold the rest
        task.add_done_callback(self._answering.discard)

    async def _answer(self, msg: Msg, kind: str, tenant: str) -> None:
        """Answer an admitted query: its page, or an error saying why not (whatever went
        wrong: a request that is no answer, a failed read, a bug)."""
        try:
            async with self.admission.answering(tenant):
                if kind == COST:
                    reply = (await self.cost(tenant, CostRequest.decode(msg.data))).encode()
                else:
                    reply = (await self.events_page(tenant,
                                                    EventsRequest.decode(msg.data))).encode()
        except (ValueError, nats.errors.Error) as exc:
            log.warning("query %s of tenant %r not answered: %s", kind, tenant, exc)
            reply = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
        except Exception as exc:
            log.exception("query %s of tenant %r failed", kind, tenant)
            reply = json.dumps({"error": f"cost-autoscaler failed to answer: "
                                         f"{type(exc).__name__}: {exc}"}).encode()
        if len(reply) > self.nc.max_payload:  # a page is below it: this would be a bug
            log.error("answer to %s is %d bytes, over max_payload", msg.subject, len(reply))
            reply = json.dumps({"error": f"the answer is {len(reply)} bytes, over the "
                                         f"server's max_payload {self.nc.max_payload}"}).encode()
        await self._respond(msg, reply)

    async def _respond(self, msg: Msg, reply: bytes) -> None:
        try:
            await msg.respond(reply)
        except nats.errors.Error as exc:  # the asker times out; this says why
            log.warning("answer to %s (%d bytes) not sent: %s", msg.subject, len(reply), exc)

    def page_budget(self) -> int:
        """A reply's bytes at most: ours, and half the server's limit, not ours."""
        return min(PAGE_BYTES, self.nc.max_payload // 2)

    async def read_ledger(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """(every run's entry, the serving entry), read at most once per `LEDGER_TTL_S`."""
        async with self._ledger_lock:
            if self._ledger_read and time.monotonic() - self._ledger_read[0] < LEDGER_TTL_S:
                return self._ledger_read[1], self._ledger_read[2]
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
            self._ledger_read = (time.monotonic(), entries, serving)
            return entries, serving

    async def cost(self, tenant: str, request: CostRequest) -> CostPage:
        """`tenant`'s ledger entries after `request.after` in run id order, as many as fit
        in one page; the serving entry (`tenant_serving`) on the first page."""
        entries, serving = await self.read_ledger()
        mine = tenant_ledger(entries, tenant)
        page = CostPage(serving={} if request.after else tenant_serving(serving, entries,
                                                                         tenant))
        size, budget = PAGE_OVERHEAD + json_size(page.serving), self.page_budget()
        for run_id in sorted(r for r in mine if r > request.after):
            item = page_item_size({run_id: mine[run_id]}) + json_size(run_id)  # next_after
            if size + item > budget:
                if not page.runs:
                    raise ValueError(f"the ledger entry of run {run_id!r} is {item} bytes, "
                                     f"more than one answer holds ({budget})")
                page.end = False
                return page
            page.runs[run_id] = mine[run_id]
            page.next_after = run_id
            size += item
        return page

    async def events_page(self, tenant: str, request: EventsRequest) -> EventsPage:
        """`tenant`'s events from `request.from_seq` up to what the stream held when asked,
        or as many as fit in one page, or as many as came within the page's time."""
        info = await self.js.stream_info(subjects.STREAM)
        last = info.state.last_seq
        if request.from_seq > last or not info.state.messages:
            return EventsPage(next_seq=request.from_seq, end=True)
        page = EventsPage(next_seq=request.from_seq, end=False)
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                opt_start_seq=request.from_seq)
        sub = await self.js.subscribe("lmforge.>", ordered_consumer=True,
                                      stream=subjects.STREAM, config=config)
        size, deadline = PAGE_OVERHEAD, time.monotonic() + PAGE_SECONDS
        budget = self.page_budget()
        try:
            while time.monotonic() < deadline:
                try:
                    msg = await sub.next_msg(timeout=self.read_timeout_s)
                except nats.errors.TimeoutError:
                    break  # slow, not the end (`seq >= last` is): the client asks again
                seq = msg.metadata.sequence.stream
                headers = msg.headers or {}
                if (event_tenant(msg) == tenant
                        and (not request.run_id or headers.get(Header.RUN_ID) == request.run_id)):
                    ts = msg.metadata.timestamp.timestamp() if msg.metadata.timestamp else 0.0
                    event = QueriedEvent(seq=seq, subject=msg.subject, data=msg.data, time=ts,
                                         cached_from=headers.get(Header.CACHED_FROM, ""))
                    item = page_item_size(event.as_json())
                    if size + item > budget:
                        if page.events:
                            break  # the next page starts with it (next_seq is its seq)
                        log.warning("event %d (%s) of tenant %r is %d bytes, more than one "
                                    "answer holds (%d): sent without its data", seq,
                                    msg.subject, tenant, len(msg.data), budget)
                        event = replace(event, data=b"", omitted_bytes=len(msg.data))
                        item = page_item_size(event.as_json())
                    page.events.append(event)
                    size += item
                page.next_seq = seq + 1
                if seq >= last:
                    page.end = True
                    break
        finally:
            await sub.unsubscribe()
        return page
