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
- a handler that raises `BadInput` fails the run once: a `stage.failed`
  event, no retries; any other exception is retried with backoff and
  dead-lettered after `max_deliver` deliveries;
- a handled event is recorded in the `lmforge_stage_records` key-value bucket
  after its outputs are published, so the same event delivered again, or
  published again, is acknowledged without doing the work twice;
- a cached stage whose inputs and config are unchanged replays its earlier
  outputs for the new run (`lmforge_stage_cache`).

The steps of handling one message live in `dispatch.py`, shared with the
in-memory bus of `testing.py`; this module is the NATS transport around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Mapping

import nats
import nats.errors
import nats.js.errors
from google.protobuf.message import Message
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue as NatsKV

from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket, Header
from lmforge.contracts.subjects import Subject
from lmforge.dispatch import (
    Dispatcher,
    Outcome,
    RawMessage,
    Subscription,
    event_headers,
    retry_delay_s,
)
from lmforge.runtime.publish_journal import journal_from_env
from lmforge.security.nats_connect import NatsAuth
from lmforge.telemetry import EVENTS_PUBLISHED

log = logging.getLogger("lmforge.bus")

PUBLISH_REFUSED = re.compile(r"permissions violation for publish to \"?([^\s\"']+)", re.I)
"""How nats-server words a publish outside the user's permissions (an -ERR)."""

TRANSIENT_NATS_ERRORS: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError, nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError,
    nats.js.errors.ServiceUnavailableError, nats.js.errors.NoStreamResponseError)
"""What a JetStream request answers while a server restarts or a stream elects a leader:
"no responders" comes back as NoStreamResponseError from a publish (a three-node
cluster's leader kill showed it; it used to fail the handler and redo its work)."""


class NatsKeyValue:
    """A JetStream key-value bucket behind the `dispatch.KeyValue` protocol."""

    def __init__(self, js: JetStreamContext, bucket: str, *, replicas: int = 1) -> None:
        self.js = js
        self.bucket = bucket
        self.replicas = replicas
        self._kv: NatsKV | None = None

    async def _open(self) -> NatsKV:
        if self._kv is None:
            self._kv = await ensure_kv(self.js, self.bucket, replicas=self.replicas)
        return self._kv

    async def get(self, key: str) -> bytes | None:
        kv = await self._open()
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value

    async def put(self, key: str, value: bytes, *, retry_for_s: float = 30.0) -> None:
        """Store `value`, retried with backoff through a leader election or a restart (a
        stage record lost here would make a redelivery redo the stage)."""
        delay, deadline = 0.05, time.monotonic() + retry_for_s
        while True:
            try:
                await (await self._open()).put(key, value)
                return
            except TRANSIENT_NATS_ERRORS:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def put_if_absent(self, key: str, value: bytes, *, retry_for_s: float = 30.0
                            ) -> bytes:
        """Store `value` unless `key` holds one (the server's create-if-absent, so of two
        racing writers one wins); the value `key` holds now, retried as `put` is."""
        delay, deadline = 0.05, time.monotonic() + retry_for_s
        while True:
            try:
                kv = await self._open()
                try:
                    await kv.create(key, value)
                    return value
                except nats.js.errors.KeyWrongLastSequenceError:
                    held = await self.get(key)
                    if held is not None:
                        return held
                    # deleted between the two calls: create again
            except TRANSIENT_NATS_ERRORS:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def delete(self, key: str) -> None:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            await (await self._open()).delete(key)

    async def keys(self) -> list[str]:
        try:
            return list(await (await self._open()).keys())
        except nats.js.errors.NoKeysError:
            return []


class ConnectionLog:
    """One log line per change of the connection's state, never a traceback per retry.

    nats-py reports every failed reconnect attempt (twice a second while the
    server is down); an operator wants to read "lost", then "back".
    """

    def __init__(self, service: str, url: str) -> None:
        self.service = service
        self.url = url
        self.connected = True
        self.closing = False
        self.last_error = ""
        self.refused_publishes: set[str] = set()
        """Subjects the server refused this user (a permissions violation)."""

    async def on_error(self, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        refused = PUBLISH_REFUSED.search(str(exc))
        if refused:
            self.refused_publishes.add(refused.group(1).lower())
        if reason != self.last_error:
            self.last_error = reason
            log.warning("NATS at %s: %s", self.url, reason)

    async def on_disconnected(self) -> None:
        if self.connected and not self.closing:
            self.connected = False
            log.warning("lost the connection to NATS at %s; reconnecting (handlers waiting "
                        "to publish hold their events until it is back)", self.url)

    async def on_reconnected(self) -> None:
        self.connected, self.last_error = True, ""
        log.warning("reconnected to NATS at %s", self.url)

    async def on_closed(self) -> None:
        self.connected = False


class EventBus:
    """A service's connection to JetStream, its subscriptions and its publisher."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.nc: nats.NATS | None = None
        self._js: JetStreamContext | None = None
        self._subscriptions: list[Subscription] = []
        self._buckets: dict[str, NatsKeyValue] = {}
        self.stream_replicas = 1
        self._tasks: list[asyncio.Task[None]] = []
        self._handling: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()
        self.dispatcher = Dispatcher(self)
        self.connection_log = ConnectionLog(service, "")
        self.journal = journal_from_env()
        """Where acknowledged publishes are recorded for the chaos suite (off by default)."""

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("EventBus.connect() first")
        return self._js

    # -- connection -----------------------------------------------------------------

    async def connect(self, url: str, *, connect_timeout_s: float = 30.0,
                      stream_replicas: int | None = None, auth: NatsAuth | None = None
                      ) -> None:
        """Connect (retrying until `connect_timeout_s`) and make sure the streams exist,
        with `stream_replicas` copies each (LMFORGE_STREAM_REPLICAS); None (the CLI, a
        client that cannot know): streams already there are used as they are. A tenant's
        client credential (`auth.reads_by_query`) may not even read the event stream's
        info (`nats_roles`): it only publishes, on the streams the supervisor made.

        `auth`: the credential and CA (LMFORGE_NATS_CREDS/_CA). A server that refuses
        them is retried like an absent one (the supervisor may be rotating them); the
        error says why, once in the log and again if the deadline passes.
        """
        self.stream_replicas = stream_replicas or 1
        deadline = time.monotonic() + connect_timeout_s
        self.connection_log = ConnectionLog(self.service, url)
        while True:
            try:
                # nats-py's first connect keeps trying while reconnects are unlimited:
                # the deadline is ours to keep.
                self.nc = await asyncio.wait_for(nats.connect(
                    url.split(","),
                    name=self.service,
                    connect_timeout=2,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=self.connection_log.on_error,
                    disconnected_cb=self.connection_log.on_disconnected,
                    reconnected_cb=self.connection_log.on_reconnected,
                    closed_cb=self.connection_log.on_closed,
                    **(auth or NatsAuth()).connect_options(),
                ), timeout=max(0.1, deadline - time.monotonic()))
                break

            except (TimeoutError, nats.errors.NoServersError, OSError) as exc:
                if time.monotonic() >= deadline:
                    raise ConnectionError(
                        f"cannot reach NATS at {url} within {connect_timeout_s:.0f}s: "
                        f"{exc or self.connection_log.last_error}") from exc
                await asyncio.sleep(0.5)
        self._js = self.nc.jetstream()
        if auth is None or not auth.reads_by_query:
            await ensure_streams(self._js, replicas=stream_replicas)

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
        self.connection_log.closing = True
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=2)  # acks are fire-and-forget: send them first
            with contextlib.suppress(Exception):
                await self.nc.close()

    def key_value(self, bucket: Bucket) -> NatsKeyValue:
        if bucket not in self._buckets:
            self._buckets[bucket] = NatsKeyValue(self.js, bucket,
                                                 replicas=self.stream_replicas)
        return self._buckets[bucket]

    # -- publishing -----------------------------------------------------------------

    async def publish(self, event: Message, *, msg_id: str,
                      headers: Mapping[str, str] | None = None,
                      retry_for_s: float = 60.0) -> None:
        """Publish `event` on its catalog subject, retried until the server stores it.

        While the connection is down (a restarting nats-server) this waits for it
        to come back, however long that takes: the event is the output of work
        already done, and `Nats-Msg-Id` makes the retries safe. While connected
        but unanswered (a leader election), it gives up after `retry_for_s`.
        """
        subject = subjects.for_message(event)
        concrete = subject.for_tenant(str(getattr(event, "tenant", "")))
        hdrs = event_headers(event, msg_id=msg_id, extra=headers)
        data = event.SerializeToString()
        delay, deadline = 0.05, time.monotonic() + retry_for_s
        while True:
            try:
                ack = await self.js.publish(concrete, data, headers=hdrs, timeout=5)
                EVENTS_PUBLISHED.labels(subject.name).inc()
                if self.journal is not None:
                    self.journal.record(subject=subject.name, msg_id=msg_id,
                                        run_id=hdrs.get(Header.RUN_ID, ""),
                                        duplicate=bool(ack.duplicate))
                return
            except TRANSIENT_NATS_ERRORS as exc:
                if concrete.lower() in self.connection_log.refused_publishes:
                    raise PermissionError(f"NATS refused {self.service} publishing "
                                          f"{concrete}: not among its permissions "
                                          f"(lmforge.security.nats_roles)") from exc
                if self._server_reachable() and time.monotonic() > deadline:
                    raise ConnectionError(f"publish to {concrete} failed: {exc}") from exc
                if not self._server_reachable():
                    deadline = time.monotonic() + retry_for_s  # the clock runs when it is up
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _server_reachable(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def publish_dead_letter(self, original: Subject[Message], data: bytes,
                                  headers: Mapping[str, str]) -> None:
        subject = f"{subjects.DEAD_LETTER_PREFIX}.{self.service}"
        ack = await self.js.publish(subject, data, headers=dict(headers), timeout=5)
        if self.journal is not None:
            self.journal.record(subject=subject, msg_id=headers.get(Header.MSG_ID, ""),
                                run_id=headers.get(Header.RUN_ID, ""),
                                duplicate=bool(ack.duplicate))

    # -- consuming ------------------------------------------------------------------

    def subscribe(self, subscription: Subscription) -> None:
        """Consume `subscription` once `start()` runs (replicas share its durable)."""
        self._subscriptions.append(subscription)

    async def start(self) -> None:
        """Start one fetch loop per subscription."""
        for sub in self._subscriptions:
            config = api.ConsumerConfig(
                durable_name=sub.durable,
                ack_policy=api.AckPolicy.EXPLICIT,
                deliver_policy=api.DeliverPolicy.ALL,
                ack_wait=sub.ack_wait_s,
                # We count deliveries ourselves so the last one can be
                # dead-lettered with its reason; this is only a backstop.
                max_deliver=sub.max_deliver + 2,
                filter_subject=sub.subject.pattern,
            )
            await self._align_filter(config)
            psub = await self.js.pull_subscribe(
                sub.subject.pattern, durable=sub.durable, stream=subjects.STREAM,
                config=config)
            self._tasks.append(asyncio.create_task(self._fetch_loop(sub, psub)))

    async def _align_filter(self, config: api.ConsumerConfig) -> None:
        """Move a durable created by an earlier build onto the subject it filters on now.

        nats-py binds to an existing durable as it is; one made when dataset.ready had
        no tenant token would filter on `lmforge.dataset.ready` and never see another
        event, with nothing in any log. The server updates a durable's filter in place,
        keeping its position in the stream.
        """
        assert config.durable_name is not None
        try:
            info = await self.js.consumer_info(subjects.STREAM, config.durable_name)
        except nats.js.errors.NotFoundError:
            return
        if info.config.filter_subject != config.filter_subject:
            log.warning("durable %s filtered on %s; moving it to %s", config.durable_name,
                        info.config.filter_subject, config.filter_subject)
            await self.js.add_consumer(subjects.STREAM, config)

    async def _fetch_loop(self, sub: Subscription,
                          psub: JetStreamContext.PullSubscription) -> None:
        failing = ""
        while not self._closing.is_set():
            try:
                msgs = await psub.fetch(1, timeout=5)
            except nats.errors.TimeoutError:
                continue
            except (nats.errors.ConnectionClosedError, asyncio.CancelledError):
                return
            except Exception as exc:  # reconnecting, leader election: wait and go on
                reason = f"{type(exc).__name__}: {exc}"
                if reason != failing:  # once per kind of failure, not twice a second
                    log.warning("fetching %s failed; retrying: %s", sub.subject.name, reason)
                failing = reason
                await asyncio.sleep(0.5)
                continue
            if failing:
                log.info("fetching %s again", sub.subject.name)
                failing = ""
            me = asyncio.current_task()
            assert me is not None
            self._handling.add(me)
            try:
                for msg in msgs:
                    await self._handle_one(sub, msg)
            finally:
                self._handling.discard(me)

    async def _handle_one(self, sub: Subscription, msg: Msg) -> None:
        """Handle and settle one message; a NATS error on the way (a stage record that
        cannot be read or written while a restarted server recovers its streams) leaves
        it for a later delivery instead of ending this subscription's fetch loop, which
        used to stop the service consuming while it still reported itself ready."""
        try:
            await self._settle(msg, await self.dispatcher.handle(sub, _raw(msg)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("handling %s (delivery %d) hit %s: %s; it will be delivered again",
                        sub.subject.name, msg.metadata.num_delivered, type(exc).__name__, exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=retry_delay_s(msg.metadata.num_delivered))

    async def _settle(self, msg: Msg, outcome: Outcome) -> None:
        if outcome.acknowledged:
            await msg.ack()
        elif outcome is Outcome.RETRIED:
            await msg.nak(delay=retry_delay_s(msg.metadata.num_delivered))
        else:
            await msg.term()


def _raw(msg: Msg) -> RawMessage:
    return RawMessage(data=msg.data, headers=dict(msg.headers or {}), subject=msg.subject,
                      deliveries=msg.metadata.num_delivered,
                      stream_seq=msg.metadata.sequence.stream, keep_alive=msg.in_progress)


class StreamSetupError(RuntimeError):
    """The event streams are not there as wanted and this process could not make them."""


async def ensure_streams(js: JetStreamContext, *, replicas: int | None = 1) -> None:
    """Create (or update) the file-backed streams, `replicas` copies each (R3 on a
    three-node cluster); safe for every process to call. `replicas=None`: keep the copies
    an existing stream has (a client such as `lmforge run` on a cluster's R3 streams used
    to ask for R1, an update its role may not make: its run was never published).

    A stream already there with the subjects and replicas wanted is left alone, so a
    process that may only read stream info (every service, with NATS security on: the
    supervisor creates the streams) passes here without touching them.
    """
    wanted = [
        api.StreamConfig(
            name=subjects.STREAM,
            subjects=[s.pattern for s in subjects.ALL],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            duplicate_window=120.0,
            max_age=30 * 24 * 3600.0,
            num_replicas=replicas or 1,
        ),
        api.StreamConfig(
            name=subjects.DEAD_LETTER_STREAM,
            subjects=[f"{subjects.DEAD_LETTER_PREFIX}.>"],
            storage=api.StorageType.FILE,
            duplicate_window=120.0,
            num_replicas=replicas or 1,
        ),
    ]
    for config in wanted:
        try:
            info = await js.stream_info(str(config.name))
        except nats.js.errors.NotFoundError:
            info = None
        if info is not None and set(info.config.subjects or ()) == set(
                config.subjects or ()) and replicas in (None, info.config.num_replicas or 1):
            continue
        try:
            try:
                await js.add_stream(config)
            except nats.js.errors.BadRequestError:
                await js.update_stream(config)
        except nats.errors.TimeoutError as exc:
            # With NATS security on, a credential that may not create streams gets no
            # answer at all (the server drops the request and logs a permissions
            # violation), so the bare timeout would say nothing useful.
            state = "missing" if info is None else "different (subjects or replicas)"
            raise StreamSetupError(
                f"stream {config.name} is {state} and nothing created it within the "
                "request timeout: with NATS security on only the admin credential may "
                "create streams; run `lmforge nats-init` (the supervisor, compose's "
                "nats-init service and the Kubernetes nats-init Job do) before the "
                "services") from exc


async def ensure_kv(js: JetStreamContext, bucket: str, *, history: int = 1,
                    replicas: int = 1) -> NatsKV:
    """A file-backed key-value bucket (`replicas` copies), created on first use."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        try:
            return await js.create_key_value(
                bucket=bucket, history=history, storage=api.StorageType.FILE, direct=True,
                replicas=replicas,
            )
        except nats.js.errors.BadRequestError:  # created by a sibling meanwhile
            return await js.key_value(bucket)
