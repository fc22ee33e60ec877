"""Handling one event, independent of the transport: decode, check, run, settle.

The NATS bus (`bus.py`) and the in-memory bus (`testing.py`) hand every message
to the same `Dispatcher`, so a handler test on the in-memory bus exercises the
code that runs in production. The steps, each a short method:

1. decode — a message we cannot read (bad protobuf, a newer schema) is
   dead-lettered at once with the reason;
2. already done? — the same payload handled before by this durable consumer
   (a redelivery or a republish) is acknowledged without work; whose? — the
   event that starts a run (dataset.ready) is its tenant's by the subject the
   server let it publish on, and claims its run id for that tenant: a run id
   another tenant used first fails the run once, with the reason;
3. cached? — a stage whose inputs (artifact digests, file contents) and config
   are unchanged replays the outputs it stored for an earlier run, whatever the
   run id, and says so in a header and a log line;
4. run — the handler, with a heartbeat so the server does not redeliver;
5. settle — publish the outputs, record the event, and return an `Outcome`
   that the transport turns into ack, nak (retry later) or term.

Tracing, metrics and the run id in log lines are middleware around these steps
(`Middleware`), never code inside handlers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from google.protobuf.message import DecodeError, Message
from opentelemetry.trace import SpanKind, Status, StatusCode

from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket, Header
from lmforge.contracts.subjects import Subject
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.failures import BadInput
from lmforge.run_context import current_run_id
from lmforge.run_ids import MAX_RUN_ID_CHARS, run_id_problem
from lmforge.run_owners import claim_run_id, run_id_taken
from lmforge.telemetry import (
    EVENTS_CONSUMED,
    HANDLER_SECONDS,
    extract_context,
    inject_context,
    tracer,
)

log = logging.getLogger("lmforge.bus")

Outputs = Message | Sequence[Message] | None
M = TypeVar("M", bound=Message)
Svc = TypeVar("Svc")


class KeyValue(Protocol):
    """A key-value bucket: JetStream KV on NATS, a dict in memory."""

    async def get(self, key: str) -> bytes | None: ...
    async def put(self, key: str, value: bytes) -> None: ...
    async def delete(self, key: str) -> None: ...
    async def keys(self) -> list[str]: ...
    async def put_if_absent(self, key: str, value: bytes) -> bytes:
        """Store `value` unless `key` holds one, atomically; the value `key` holds now."""
        ...


class Transport(Protocol):
    """What the dispatcher and handlers need from a bus."""

    service: str

    async def publish(self, event: Message, *, msg_id: str,
                      headers: Mapping[str, str] | None = None) -> None: ...

    async def publish_dead_letter(self, original: Subject[Message], data: bytes,
                                  headers: Mapping[str, str]) -> None: ...

    def key_value(self, bucket: Bucket) -> KeyValue: ...


class Outcome(StrEnum):
    """How a message was settled; also the `outcome` label of the consumed-events metric."""

    OK = "ok"
    DUPLICATE = "duplicate"
    CACHED = "cached"
    FAILED = "failed"
    RETRIED = "retried"
    DEAD_LETTERED = "dead_lettered"

    @property
    def acknowledged(self) -> bool:
        """Done with: the transport acks it (RETRIED naks, DEAD_LETTERED terms)."""
        return self in (Outcome.OK, Outcome.DUPLICATE, Outcome.CACHED, Outcome.FAILED)


def event_headers(event: Message, *, msg_id: str,
                  extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The headers of a published event: id, schema, run id, tenant (of an event that
    names one: dataset.ready), trace context, and `extra`."""
    headers = {
        str(Header.MSG_ID): msg_id,
        str(Header.SCHEMA): str(subjects.SCHEMA_VERSION),
        str(Header.RUN_ID): str(getattr(event, "run_id", "")),
        **{str(k): v for k, v in (extra or {}).items()},
    }
    tenant = getattr(event, "tenant", "")
    if isinstance(tenant, str) and tenant:
        headers.setdefault(str(Header.TENANT), tenant)
    inject_context(headers)
    return headers


def retry_delay_s(deliveries: int) -> float:
    """Backoff before the next delivery of an event whose handler raised."""
    return min(2.0 ** deliveries, 30.0)


@dataclass(slots=True)
class Delivery:
    """What a handler knows about the message it was handed."""

    transport: Transport
    subject: Subject[Message]
    run_id: str
    msg_id: str
    deliveries: int
    headers: dict[str, str] = field(default_factory=dict)
    work_started_ns: int = 0

    @property
    def cached_from(self) -> str:
        """The run whose outputs were replayed into this event ('' when it was computed)."""
        return self.headers.get(Header.CACHED_FROM, "")

    def output_msg_id(self, out: Subject[Message], suffix: str = "") -> str:
        """A deterministic id for an event caused by this one (same input, same id)."""
        key = f"{self.msg_id}|{out.name}|{suffix}".encode()
        return f"{self.run_id}:{out.name.removeprefix('lmforge.')}:" + hashlib.sha256(
            key
        ).hexdigest()[:24]

    @property
    def tenant(self) -> str:
        """The tenant of the run this delivery belongs to ('' before tenants existed)."""
        return self.headers.get(Header.TENANT, "")

    async def publish(self, event: Message, *, suffix: str = "",
                      headers: Mapping[str, str] | None = None) -> None:
        """Publish an event caused by this delivery: it carries the run's tenant (the
        header, and the `tenant` field where the message has one) whatever the handler
        or a stage-cache replay put there, so no stage can hand a run to another tenant."""
        out = subjects.for_message(event)
        tenant_headers: dict[str, str] = {}
        if self.tenant:
            tenant_headers[Header.TENANT] = self.tenant
            if "tenant" in event.DESCRIPTOR.fields_by_name:
                setattr(event, "tenant", self.tenant)  # noqa: B010 (any message with the field)
        await self.transport.publish(
            event, msg_id=self.output_msg_id(out, suffix),
            headers={Header.WORK_STARTED_NS: str(self.work_started_ns),
                     Header.PUBLISHED_NS: str(time.time_ns()), **tenant_headers,
                     **(headers or {})})


BoundHandler = Callable[[Message, Delivery], Awaitable[Outputs]]
CacheKey = Callable[[Message], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class SubscriptionOptions:
    """What `@subscriber(...)` records on a handler method."""

    subject: Subject[Message]
    ack_wait_s: float | None = None
    max_deliver: int | None = None
    idempotent: bool = True
    per_replica: bool = False
    """Each replica gets its own durable (work every replica must do) instead of a work queue."""
    cache_outputs: tuple[type[Message], ...] = ()
    """Output types that may be replayed for a later run with the same inputs; () = no cache."""


_OPTIONS_ATTR = "__lmforge_subscription__"


def subscriber(
    subject: Subject[M], *, ack_wait_s: float | None = None, max_deliver: int | None = None,
    idempotent: bool = True, per_replica: bool = False,
    cache_outputs: tuple[type[Message], ...] = (),
) -> Callable[[Callable[[Svc, M, Delivery], Awaitable[Outputs]]],
              Callable[[Svc, M, Delivery], Awaitable[Outputs]]]:
    """Declare a service method as the handler of `subject`.

    The type checker holds the method's event parameter to the subject's message
    type. The service registers every declared handler when it starts.
    """
    options = SubscriptionOptions(subject=subject, ack_wait_s=ack_wait_s,
                                  max_deliver=max_deliver, idempotent=idempotent,
                                  per_replica=per_replica, cache_outputs=cache_outputs)

    def declare(method: Callable[[Svc, M, Delivery], Awaitable[Outputs]]
                ) -> Callable[[Svc, M, Delivery], Awaitable[Outputs]]:
        setattr(method, _OPTIONS_ATTR, options)
        return method

    return declare


def declared_options(member: object) -> SubscriptionOptions | None:
    """The options `@subscriber` put on `member`, if any."""
    options = getattr(member, _OPTIONS_ATTR, None)
    return options if isinstance(options, SubscriptionOptions) else None


@dataclass(slots=True)
class Subscription:
    """A handler bound to its service, with the settings it is consumed with."""

    subject: Subject[Message]
    handler: BoundHandler
    durable: str
    ack_wait_s: float
    max_deliver: int
    idempotent: bool = True
    cache_outputs: tuple[type[Message], ...] = ()
    cache_key: CacheKey | None = None


@dataclass(slots=True)
class RawMessage:
    """A message as a transport received it."""

    data: bytes
    headers: dict[str, str]
    deliveries: int
    stream_seq: int
    subject: str = ""
    """The subject the server delivered it on (a tenant-scoped one names the tenant)."""
    keep_alive: Callable[[], Awaitable[None]] | None = None
    """Tells the server the handler is still working (JetStream's in-progress ack)."""


@dataclass(slots=True)
class HandlingContext:
    """One message on its way through the middleware and the steps."""

    subscription: Subscription
    message: RawMessage
    run_id: str
    failure: str = ""
    handler_seconds: float | None = None


Next = Callable[[], Awaitable[Outcome]]
Middleware = Callable[[HandlingContext, Next], Awaitable[Outcome]]


async def run_context_middleware(ctx: HandlingContext, call_next: Next) -> Outcome:
    """Every log line written while handling carries the run id (a contextvar)."""
    token = current_run_id.set(ctx.run_id)
    try:
        return await call_next()
    finally:
        current_run_id.reset(token)


def tracing_middleware(service: str) -> Middleware:
    """A consumer span per message, child of the publisher's trace context."""

    async def trace_handling(ctx: HandlingContext, call_next: Next) -> Outcome:
        name = ctx.subscription.subject.name
        with tracer().start_as_current_span(
            f"{service} {name.removeprefix('lmforge.')}",
            context=extract_context(ctx.message.headers), kind=SpanKind.CONSUMER,
            attributes={"messaging.destination": name, "lmforge.run_id": ctx.run_id,
                        "lmforge.deliveries": ctx.message.deliveries},
        ) as span:
            outcome = await call_next()
            span.set_attribute("lmforge.run_id", ctx.run_id)
            span.set_attribute("lmforge.outcome", outcome.value)
            if ctx.failure:
                span.set_status(Status(StatusCode.ERROR, ctx.failure))
            return outcome

    return trace_handling


async def metrics_middleware(ctx: HandlingContext, call_next: Next) -> Outcome:
    """Counts every outcome by subject; times the handler when it ran."""
    outcome = await call_next()
    name = ctx.subscription.subject.name
    EVENTS_CONSUMED.labels(name, outcome.value).inc()
    if ctx.handler_seconds is not None:
        HANDLER_SECONDS.labels(name).observe(ctx.handler_seconds)
    return outcome


def payload_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _as_list(outputs: Outputs) -> list[Message]:
    if outputs is None:
        return []
    if isinstance(outputs, Message):
        return [outputs]
    return list(outputs)


class Dispatcher:
    """Runs one message through the middleware and the steps; returns how to settle it."""

    def __init__(self, transport: Transport,
                 middleware: Sequence[Middleware] | None = None) -> None:
        self.transport = transport
        self.middleware: list[Middleware] = list(middleware) if middleware is not None else [
            run_context_middleware, tracing_middleware(transport.service), metrics_middleware]

    async def handle(self, sub: Subscription, message: RawMessage) -> Outcome:
        ctx = HandlingContext(sub, message, run_id=message.headers.get(Header.RUN_ID, ""))

        async def innermost() -> Outcome:
            return await self._steps(ctx)

        call: Next = innermost
        for layer in reversed(self.middleware):
            call = _bind(layer, ctx, call)
        return await call()

    async def _steps(self, ctx: HandlingContext) -> Outcome:
        event = await self._decode(ctx)
        if event is None:
            return Outcome.DEAD_LETTERED
        if await self._already_done(ctx):
            log.info("duplicate event ignored")
            return Outcome.DUPLICATE
        if not await self._tenant_checked(ctx, event):
            return Outcome.FAILED
        if not await self._run_id_owned(ctx):
            return Outcome.FAILED
        cache_key = await self._cache_key(ctx, event)
        if cache_key is None:
            return Outcome.FAILED
        if cache_key and await self._replay_cached(ctx, event, cache_key):
            await self._record_done(ctx)
            return Outcome.CACHED
        return await self._run(ctx, event, cache_key)

    # -- 1. decode ------------------------------------------------------------------

    async def _decode(self, ctx: HandlingContext) -> Message | None:
        headers, data = ctx.message.headers, ctx.message.data
        sub = ctx.subscription
        try:
            version = int(headers.get(Header.SCHEMA, "1") or "1")
        except ValueError:
            version = -1
        if not 0 <= version <= subjects.SCHEMA_VERSION:
            await self._dead_letter(ctx, f"unsupported schema version "
                                         f"{headers.get(Header.SCHEMA)!r} (this build reads up "
                                         f"to {subjects.SCHEMA_VERSION})")
            return None
        try:
            event = sub.subject.decode(data)
        except DecodeError as exc:
            await self._dead_letter(ctx, f"payload is not a valid {sub.subject.message.__name__}"
                                         f" ({len(data)} bytes): {exc}")
            return None
        ctx.run_id = getattr(event, "run_id", "") or ctx.run_id
        current_run_id.set(ctx.run_id)
        problem = run_id_problem(ctx.run_id)
        if problem:
            await self._dead_letter(ctx, problem)
            return None
        return event

    # -- 2. already done? and whose? ---------------------------------------------------

    async def _tenant_checked(self, ctx: HandlingContext, event: Message) -> bool:
        """On a tenant-scoped subject, the tenant is the subject's token — what the server
        let the publisher's credential publish — and the event's own field must agree.

        The tenant header is set from the token, overwriting whatever the publisher sent,
        so every event caused by this one carries the tenant NATS vouched for. A
        disagreement (a tenant-A credential naming tenant B in the body) fails the run
        once, with both names, and does no work.
        """
        subject = ctx.subscription.subject
        if not subject.tenant_scoped:
            return True
        if not subject.matches(ctx.message.subject):
            reason = (f"{subject.name} delivered on {ctx.message.subject!r}, which names no "
                      f"tenant ({subject.pattern})")
        else:
            vouched = subject.tenant_of(ctx.message.subject)
            claimed = str(getattr(event, "tenant", ""))
            if claimed == vouched:
                ctx.message.headers[Header.TENANT] = vouched
                if not vouched:
                    ctx.message.headers.pop(Header.TENANT, None)
                return True
            reason = (f"tenant mismatch: the event claims tenant {claimed!r} but was "
                      f"published on {ctx.message.subject}, which only tenant "
                      f"{vouched or '(none)'!r} may publish; publish with that tenant's "
                      f"credential")
        await self._fail(ctx, reason, dead_lettered=False)
        await self._record_done(ctx)
        return False

    async def _run_id_owned(self, ctx: HandlingContext) -> bool:
        """The event that starts a run (on a tenant-scoped subject) claims its run id for
        the run's tenant; a run id first used by another tenant fails the run once, before
        any work or stage-cache replay (`lmforge.run_owners`)."""
        if not ctx.subscription.subject.tenant_scoped:
            return True
        tenant = ctx.message.headers.get(Header.TENANT, "")  # vouched: `_tenant_checked`
        owner = await claim_run_id(self.transport.key_value(Bucket.RUN_OWNERS), ctx.run_id,
                                   tenant)
        if owner == tenant:
            return True
        log.warning("run id %r of tenant %r refused: it belongs to tenant %r", ctx.run_id,
                    tenant, owner)
        await self._fail(ctx, run_id_taken(ctx.run_id), dead_lettered=False)
        await self._record_done(ctx)
        return False

    def _record_key(self, ctx: HandlingContext) -> str:
        return f"{ctx.subscription.durable}.{payload_digest(ctx.message.data)}"

    async def _already_done(self, ctx: HandlingContext) -> bool:
        if not ctx.subscription.idempotent:
            return False
        records = self.transport.key_value(Bucket.STAGE_RECORDS)
        return await records.get(self._record_key(ctx)) is not None

    async def _record_done(self, ctx: HandlingContext) -> None:
        if ctx.subscription.idempotent:
            await self.transport.key_value(Bucket.STAGE_RECORDS).put(self._record_key(ctx),
                                                                     b"done")

    # -- 3. cached? -----------------------------------------------------------------

    async def _cache_key(self, ctx: HandlingContext, event: Message) -> str | None:
        """'' when the stage is not cached, None when computing the key found bad input.

        The key holds the run's tenant: one tenant's run never replays another's outputs,
        which would tell it that the other ran the same data, and under which run id."""
        sub = ctx.subscription
        if not (sub.cache_outputs and sub.cache_key):
            return ""
        tenant = ctx.message.headers.get(Header.TENANT, "")
        scope = f"{self.transport.service}.{tenant}" if tenant else self.transport.service
        try:
            return f"{scope}.{await sub.cache_key(event)}"
        except BadInput as exc:
            await self._fail(ctx, str(exc), dead_lettered=False)
            await self._record_done(ctx)
            return None

    async def _replay_cached(self, ctx: HandlingContext, event: Message, key: str) -> bool:
        stored = await self.transport.key_value(Bucket.STAGE_CACHE).get(key)
        if stored is None:
            return False
        entry = json.loads(stored)
        source_run = str(entry["run_id"])
        delivery = self._delivery(ctx)
        for item in entry["outputs"]:
            out = subjects.by_name(item["subject"]).decode(base64.b64decode(item["data"]))
            _retarget(out, event)
            await delivery.publish(out, headers={Header.CACHED_FROM: source_run})
        log.info("inputs and config unchanged since run %s: reused its %d output(s) of %s",
                 source_run, len(entry["outputs"]), ctx.subscription.subject.name)
        return True

    async def _store_cached(self, ctx: HandlingContext, key: str, outputs: list[Message]) -> None:
        wanted = ctx.subscription.cache_outputs
        if not outputs or not all(isinstance(out, wanted) for out in outputs):
            return  # e.g. a trainer handing back after a preemption: nothing final to reuse
        entry: dict[str, Any] = {
            "run_id": ctx.run_id,
            "outputs": [{"subject": subjects.for_message(out).name,
                         "data": base64.b64encode(out.SerializeToString()).decode()}
                        for out in outputs]}
        await self.transport.key_value(Bucket.STAGE_CACHE).put(key, json.dumps(entry).encode())

    # -- 4. run and 5. settle -------------------------------------------------------------

    def _delivery(self, ctx: HandlingContext) -> Delivery:
        headers = ctx.message.headers
        msg_id = headers.get(Header.MSG_ID, f"seq-{ctx.message.stream_seq}")
        return Delivery(self.transport, ctx.subscription.subject, ctx.run_id, msg_id,
                        ctx.message.deliveries, headers, time.time_ns())

    async def _run(self, ctx: HandlingContext, event: Message, cache_key: str) -> Outcome:
        sub = ctx.subscription
        delivery = self._delivery(ctx)
        heartbeat = (asyncio.create_task(_keep_alive(ctx.message.keep_alive, sub.ack_wait_s))
                     if ctx.message.keep_alive else None)
        started = time.perf_counter()
        try:
            outputs = _as_list(await sub.handler(event, delivery))
            for out in outputs:
                await delivery.publish(out)
        except BadInput as exc:
            await self._fail(ctx, str(exc), dead_lettered=False)
            await self._record_done(ctx)
            return Outcome.FAILED
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return await self._retry_or_dead_letter(ctx, exc)
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
            ctx.handler_seconds = time.perf_counter() - started
        if cache_key:
            await self._store_cached(ctx, cache_key, outputs)
        await self._record_done(ctx)
        return Outcome.OK

    async def _retry_or_dead_letter(self, ctx: HandlingContext, exc: Exception) -> Outcome:
        sub, deliveries = ctx.subscription, ctx.message.deliveries
        reason = f"{type(exc).__name__}: {exc}"
        if deliveries >= sub.max_deliver:
            await self._dead_letter(ctx, f"failed {deliveries} deliveries; last: {reason}")
            return Outcome.DEAD_LETTERED
        ctx.failure = reason
        log.warning("handler failed (delivery %d of %d); will retry: %s",
                    deliveries, sub.max_deliver, reason, exc_info=exc)
        return Outcome.RETRIED

    def _run_tenant(self, ctx: HandlingContext) -> str:
        """The tenant of the run a message belongs to, as far as it is vouched for: the
        subject's token on a tenant-scoped subject (a header there is the publisher's
        word), else the header services carry on from dataset.ready."""
        subject = ctx.subscription.subject
        if subject.tenant_scoped:
            return subject.tenant_of(ctx.message.subject)
        return ctx.message.headers.get(Header.TENANT, "")

    async def _fail(self, ctx: HandlingContext, reason: str, *, dead_lettered: bool) -> None:
        """Publish stage.failed with the run's tenant, so the tenant reads it (`lmforge run`
        shows why) and the id of one tenant's failure never dedups another's."""
        sub = ctx.subscription
        tenant = self._run_tenant(ctx)
        scope = f"{tenant}|" if tenant else ""
        key = hashlib.sha256(f"{scope}{sub.durable}|{ctx.run_id}|{reason}".encode()
                             ).hexdigest()[:24]
        reason = bounded(reason, MAX_REASON_CHARS)
        run_id = bounded(ctx.run_id, MAX_RUN_ID_CHARS)
        ctx.failure = reason
        log.error("stage failed: %s", reason, extra={"subject": sub.subject.name,
                                                     "stage": self.transport.service})
        failed = ev.StageFailed(run_id=run_id, stage=self.transport.service,
                                subject=sub.subject.name, reason=reason,
                                deliveries=ctx.message.deliveries, dead_lettered=dead_lettered)
        await self.transport.publish(failed, msg_id=f"{run_id}:stage.failed:{key}",
                                     headers={Header.TENANT: tenant} if tenant else None)

    async def _dead_letter(self, ctx: HandlingContext, reason: str) -> None:
        sub = ctx.subscription
        await self.transport.publish_dead_letter(sub.subject, ctx.message.data, {
            Header.FAILURE_REASON: bounded(reason, MAX_REASON_CHARS),
            Header.ORIGINAL_SUBJECT: sub.subject.name,
            Header.RUN_ID: bounded(ctx.run_id, MAX_RUN_ID_CHARS),
            Header.MSG_ID: f"dead:{sub.durable}:{ctx.message.stream_seq}",
        })
        await self._fail(ctx, reason, dead_lettered=True)


MAX_REASON_CHARS = 2000
"""A failure reason is cut to this: one that quoted a 5 MB dataset_uri back made a
stage.failed event larger than NATS's 1 MB message limit (and a 5 MB log line)."""


def bounded(text: str, limit: int) -> str:
    """`text`, cut to `limit` characters with a note of how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def _bind(layer: Middleware, ctx: HandlingContext, call_next: Next) -> Next:
    async def call() -> Outcome:
        return await layer(ctx, call_next)

    return call


def _retarget(out: Message, cause: Message) -> None:
    """Point a replayed output at the run (and model name) of the event that asked for it."""
    fields = out.DESCRIPTOR.fields_by_name
    cause_fields = cause.DESCRIPTOR.fields_by_name
    for name in ("run_id", "model_name"):
        if name in fields and name in cause_fields:
            setattr(out, name, getattr(cause, name))


async def _keep_alive(keep_alive: Callable[[], Awaitable[None]] | None, ack_wait_s: float
                      ) -> None:
    while keep_alive is not None:
        await asyncio.sleep(max(ack_wait_s / 3, 0.2))
        with contextlib.suppress(Exception):
            await keep_alive()
