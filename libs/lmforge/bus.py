"""The event bus: typed publish and consume on NATS JetStream.

Written once on nats-py rather than on faststream: the reliability contract
needs per-message control that we would otherwise fight a framework for —
in-progress acks from a timer while a handler runs in a worker thread, our
own delivery counting so the last delivery is dead-lettered *with its reason*
(the server's max_deliver drops it silently), stage records that make a
redelivered event a no-op, and acks strictly after the outputs are stored and
published. Handlers still look like faststream's: a decorated `async def`
that takes the decoded event and returns the next one.

What the bus guarantees:
- streams are file-backed; consumers are durable pull consumers with
  explicit acks, shared by every replica of a service (a work queue);
- every publish carries `Nats-Msg-Id` (JetStream drops duplicates inside the
  window), the W3C trace context, the run id and the schema version, and is
  retried with backoff while the server cannot answer (leader elections);
- an event that cannot be decoded, or comes from a newer schema, goes to
  `lmforge.deadletter.<stage>` at once, and a `stage.failed` event says why;
- a handler that raises `StageError` (bad input) fails the run once: a
  `stage.failed` event, no retries; any other exception is retried with
  backoff and dead-lettered after `max_deliver` deliveries;
- a handled event is recorded in the `lmforge_stage_records` key-value bucket
  after its outputs are published, so the same event delivered again, or
  published again, is acknowledged without doing the work twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import nats
import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError, Message
from nats.aio.msg import Msg
from nats.js import api
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from lmforge.contracts import subjects
from lmforge.contracts.subjects import Subject
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.telemetry import (
    EVENTS_CONSUMED,
    EVENTS_PUBLISHED,
    HANDLER_SECONDS,
    extract_context,
    inject_context,
    tracer,
)

log = logging.getLogger("lmforge.bus")

HEADER_RUN_ID = "Lmforge-Run-Id"
HEADER_SCHEMA = "Lmforge-Schema"
HEADER_REASON = "Lmforge-Failure-Reason"
HEADER_ORIGINAL_SUBJECT = "Lmforge-Original-Subject"
HEADER_WORK_STARTED = "Lmforge-Work-Started-Ns"
"""On events a handler published: when that handler began its work (time_ns). With
the stream timestamps this splits a run's wall time into stage work and the bus."""
STAGE_RECORDS_BUCKET = "lmforge_stage_records"


class StageError(Exception):
    """Bad input: the run cannot go on and retrying will not help.

    The message should say what was wrong, with what value, and what to do.
    """


Outputs = Message | Sequence[Message] | None
Handler = Callable[[Message, "Delivery"], Awaitable[Outputs]]


@dataclass(slots=True)
class Subscription:
    subject: Subject
    handler: Handler
    durable: str
    ack_wait_s: float
    max_deliver: int
    idempotent: bool


@dataclass(slots=True)
class Delivery:
    """What a handler knows about the message it was handed."""

    bus: EventBus
    subject: Subject
    run_id: str
    msg_id: str
    deliveries: int
    headers: dict[str, str] = field(default_factory=dict)
    work_started_ns: int = 0

    def output_msg_id(self, out: Subject, suffix: str = "") -> str:
        """A deterministic id for an event caused by this one (same input, same id)."""
        key = f"{self.msg_id}|{out.name}|{suffix}".encode()
        return f"{self.run_id}:{out.name.removeprefix('lmforge.')}:" + hashlib.sha256(
            key
        ).hexdigest()[:24]

    async def publish(self, event: Message, *, suffix: str = "") -> None:
        out = subjects.for_message(event)
        await self.bus.publish(event, msg_id=self.output_msg_id(out, suffix),
                               headers={HEADER_WORK_STARTED: str(self.work_started_ns)})


def _durable_name(service: str, subject: Subject) -> str:
    return f"{service}__{subject.name.removeprefix('lmforge.').replace('.', '_')}"


def payload_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class EventBus:
    """A service's connection to JetStream, its subscriptions and its publisher."""

    def __init__(self, service: str, *, ack_wait_s: float = 30.0, max_deliver: int = 5) -> None:
        self.service = service
        self.ack_wait_s = ack_wait_s
        self.max_deliver = max_deliver
        self.nc: nats.NATS | None = None
        self.js: nats.js.JetStreamContext | None = None
        self._subscriptions: list[Subscription] = []
        self._stage_records = None
        self._tasks: list[asyncio.Task] = []
        self._handling: set[asyncio.Task] = set()
        self._closing = asyncio.Event()

    # -- connection -----------------------------------------------------------------

    async def connect(self, url: str, *, connect_timeout_s: float = 30.0) -> None:
        """Connect (retrying until `connect_timeout_s`) and make sure the streams exist."""
        deadline = time.monotonic() + connect_timeout_s
        while True:
            try:
                self.nc = await nats.connect(
                    url.split(","),
                    name=self.service,
                    connect_timeout=2,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                )
                break
            except (nats.errors.NoServersError, OSError) as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(f"cannot reach NATS at {url}: {exc}") from exc
                await asyncio.sleep(0.5)
        self.js = self.nc.jetstream()
        await ensure_streams(self.js)
        self._stage_records = await ensure_kv(self.js, STAGE_RECORDS_BUCKET)

    async def close(self, *, grace_s: float = 60.0) -> None:
        """Stop fetching, let in-flight handlers finish (up to `grace_s`), disconnect."""
        self._closing.set()
        for task in self._tasks:
            if task not in self._handling:
                task.cancel()
        busy = [t for t in self._tasks if t in self._handling]
        if busy:
            await asyncio.wait(busy, timeout=grace_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=2)  # acks are fire-and-forget: send them first
            with contextlib.suppress(Exception):
                await self.nc.close()

    # -- publishing -----------------------------------------------------------------

    async def publish(
        self, event: Message, *, msg_id: str, headers: dict[str, str] | None = None,
        retry_for_s: float = 60.0,
    ) -> api.PubAck:
        """Publish `event` on its catalog subject, retried while the server cannot answer."""
        assert self.js is not None, "connect() first"
        subject = subjects.for_message(event)
        hdrs = {
            "Nats-Msg-Id": msg_id,
            HEADER_SCHEMA: str(subjects.SCHEMA_VERSION),
            HEADER_RUN_ID: getattr(event, "run_id", ""),
            **(headers or {}),
        }
        inject_context(hdrs)
        data = event.SerializeToString()
        delay, deadline = 0.05, time.monotonic() + retry_for_s
        while True:
            try:
                ack = await self.js.publish(subject.name, data, headers=hdrs, timeout=5)
                EVENTS_PUBLISHED.labels(subject.name).inc()
                return ack
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                    nats.js.errors.ServiceUnavailableError) as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(f"publish to {subject.name} failed: {exc}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    # -- consuming ------------------------------------------------------------------

    def subscriber(
        self, subject: Subject, *, ack_wait_s: float | None = None,
        max_deliver: int | None = None, idempotent: bool = True, durable: str | None = None,
    ) -> Callable[[Handler], Handler]:
        """Register the decorated handler for `subject`.

        Replicas share one durable consumer (a work queue) unless `durable` gives
        each its own, for work every replica must do (a gateway loading a model).
        """

        def register(handler: Handler) -> Handler:
            self._subscriptions.append(
                Subscription(
                    subject=subject,
                    handler=handler,
                    durable=durable or _durable_name(self.service, subject),
                    ack_wait_s=ack_wait_s or self.ack_wait_s,
                    max_deliver=max_deliver or self.max_deliver,
                    idempotent=idempotent,
                )
            )
            return handler

        return register

    async def start(self) -> None:
        """Start one fetch loop per registered subscription."""
        assert self.js is not None, "connect() first"
        for sub in self._subscriptions:
            psub = await self.js.pull_subscribe(
                sub.subject.name,
                durable=sub.durable,
                stream=subjects.STREAM,
                config=api.ConsumerConfig(
                    durable_name=sub.durable,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    deliver_policy=api.DeliverPolicy.ALL,
                    ack_wait=sub.ack_wait_s,
                    # We count deliveries ourselves so the last one can be
                    # dead-lettered with its reason; this is only a backstop.
                    max_deliver=sub.max_deliver + 2,
                    filter_subject=sub.subject.name,
                ),
            )
            self._tasks.append(asyncio.create_task(self._fetch_loop(sub, psub)))

    async def _fetch_loop(self, sub: Subscription, psub) -> None:
        while not self._closing.is_set():
            try:
                msgs = await psub.fetch(1, timeout=5)
            except nats.errors.TimeoutError:
                continue
            except (nats.errors.ConnectionClosedError, asyncio.CancelledError):
                return
            except Exception as exc:  # reconnecting, leader election: wait and go on
                log.warning("fetch on %s failed: %s", sub.subject.name, exc)
                await asyncio.sleep(0.5)
                continue
            me = asyncio.current_task()
            self._handling.add(me)
            try:
                for msg in msgs:
                    await self._handle(sub, msg)
            finally:
                self._handling.discard(me)

    async def _handle(self, sub: Subscription, msg: Msg) -> None:
        headers = dict(msg.headers or {})
        run_id = headers.get(HEADER_RUN_ID, "")
        msg_id = headers.get("Nats-Msg-Id", f"seq-{msg.metadata.sequence.stream}")
        deliveries = msg.metadata.num_delivered
        name = sub.subject.name
        started = time.perf_counter()
        parent = extract_context(headers)
        span_name = f"{self.service} {name.removeprefix('lmforge.')}"
        with tracer().start_as_current_span(span_name, context=parent, kind=SpanKind.CONSUMER,
                                            attributes={"messaging.destination": name,
                                                        "lmforge.run_id": run_id,
                                                        "lmforge.deliveries": deliveries}) as span:
            # 1. Decode. A message we cannot read will never become readable.
            try:
                version = int(headers.get(HEADER_SCHEMA, "1") or "1")
            except ValueError:
                version = -1
            if not 0 <= version <= subjects.SCHEMA_VERSION:
                await self._dead_letter(sub, msg, run_id, deliveries,
                                        f"unsupported schema version {headers.get(HEADER_SCHEMA)!r}"
                                        f" (this build reads up to {subjects.SCHEMA_VERSION})")
                return
            try:
                event = sub.subject.decode(msg.data)
            except DecodeError as exc:
                await self._dead_letter(sub, msg, run_id, deliveries,
                                        f"payload is not a valid {sub.subject.message.__name__}"
                                        f" ({len(msg.data)} bytes): {exc}")
                return
            run_id = getattr(event, "run_id", "") or run_id
            span.set_attribute("lmforge.run_id", run_id)

            # 2. Already done? Then this is a redelivery or a republish: a no-op.
            record_key = f"{sub.durable}.{payload_digest(msg.data)}"
            if sub.idempotent and await self._record_exists(record_key):
                EVENTS_CONSUMED.labels(name, "duplicate").inc()
                log.info("duplicate event ignored", extra={"run_id": run_id, "subject": name})
                await msg.ack()
                return

            # 3. Work, telling the server we are alive so it does not redeliver.
            delivery = Delivery(self, sub.subject, run_id, msg_id, deliveries, headers,
                                time.time_ns())
            heartbeat = asyncio.create_task(self._keep_alive(msg, sub.ack_wait_s))
            try:
                outputs = await sub.handler(event, delivery)
                for out in _as_list(outputs):
                    await delivery.publish(out)
            except StageError as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                await self._fail(sub, run_id, deliveries, str(exc), dead_lettered=False)
                await self._record(record_key)
                EVENTS_CONSUMED.labels(name, "failed").inc()
                await msg.ack()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                reason = f"{type(exc).__name__}: {exc}"
                if deliveries >= sub.max_deliver:
                    await self._dead_letter(sub, msg, run_id, deliveries,
                                            f"failed {deliveries} deliveries; last: {reason}")
                else:
                    log.exception("handler failed (delivery %d of %d); will retry",
                                  deliveries, sub.max_deliver,
                                  extra={"run_id": run_id, "subject": name})
                    EVENTS_CONSUMED.labels(name, "retried").inc()
                    await msg.nak(delay=min(2.0 ** deliveries, 30.0))
                return
            finally:
                heartbeat.cancel()
                HANDLER_SECONDS.labels(name).observe(time.perf_counter() - started)
            if sub.idempotent:
                await self._record(record_key)
            EVENTS_CONSUMED.labels(name, "ok").inc()
            await msg.ack()

    async def _keep_alive(self, msg: Msg, ack_wait_s: float) -> None:
        while True:
            await asyncio.sleep(max(ack_wait_s / 3, 0.2))
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _record_exists(self, key: str) -> bool:
        try:
            await self._stage_records.get(key)
            return True
        except nats.js.errors.KeyNotFoundError:
            return False

    async def _record(self, key: str) -> None:
        await self._stage_records.put(key, b"done")

    async def _fail(self, sub: Subscription, run_id: str, deliveries: int, reason: str, *,
                    dead_lettered: bool) -> None:
        log.error("stage failed: %s", reason, extra={"run_id": run_id, "subject": sub.subject.name,
                                                      "stage": self.service})
        failed = ev.StageFailed(run_id=run_id, stage=self.service, subject=sub.subject.name,
                                reason=reason, deliveries=deliveries, dead_lettered=dead_lettered)
        key = hashlib.sha256(f"{sub.durable}|{run_id}|{reason}".encode()).hexdigest()[:24]
        await self.publish(failed, msg_id=f"{run_id}:stage.failed:{key}")

    async def _dead_letter(self, sub: Subscription, msg: Msg, run_id: str, deliveries: int,
                           reason: str) -> None:
        assert self.js is not None
        subject = f"{subjects.DEAD_LETTER_PREFIX}.{self.service}"
        headers = {
            HEADER_REASON: reason,
            HEADER_ORIGINAL_SUBJECT: sub.subject.name,
            HEADER_RUN_ID: run_id,
            "Nats-Msg-Id": f"dead:{sub.durable}:{msg.metadata.sequence.stream}",
        }
        await self.js.publish(subject, msg.data, headers=headers, timeout=5)
        await self._fail(sub, run_id, deliveries, reason, dead_lettered=True)
        EVENTS_CONSUMED.labels(sub.subject.name, "dead_lettered").inc()
        trace.get_current_span().set_status(Status(StatusCode.ERROR, reason))
        await msg.term()


def _as_list(outputs: Outputs) -> list[Message]:
    if outputs is None:
        return []
    if isinstance(outputs, Message):
        return [outputs]
    return list(outputs)


async def ensure_streams(js: nats.js.JetStreamContext) -> None:
    """Create (or update) the file-backed streams; safe for every process to call."""
    wanted = [
        api.StreamConfig(
            name=subjects.STREAM,
            subjects=[s.name for s in subjects.ALL],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            duplicate_window=120.0,
            max_age=30 * 24 * 3600.0,
        ),
        api.StreamConfig(
            name=subjects.DEAD_LETTER_STREAM,
            subjects=[f"{subjects.DEAD_LETTER_PREFIX}.>"],
            storage=api.StorageType.FILE,
            duplicate_window=120.0,
        ),
    ]
    for config in wanted:
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await js.update_stream(config)


async def ensure_kv(js: nats.js.JetStreamContext, bucket: str, *, history: int = 1):
    """A file-backed key-value bucket, created on first use."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        try:
            return await js.create_key_value(
                bucket=bucket, history=history, storage=api.StorageType.FILE, direct=True,
            )
        except nats.js.errors.BadRequestError:  # created by a sibling meanwhile
            return await js.key_value(bucket)
