"""An in-memory bus with the surface of the NATS one, for tests without a server.

A stand-in, and it says so: it is what unit tests and `make unit` run handlers
on; the same tests run against a real nats-server when marked `connected`.
Messages go through the same `dispatch.Dispatcher` steps as on NATS (decode,
already-done record, stage cache, run, settle), so bad input still becomes a
`stage.failed` event, a raising handler is retried and finally dead-lettered,
and a republished event is a no-op. What it does not model: the server's
redelivery after `ack_wait`, durability across processes, and the dedup window
(here every message id is remembered for the life of the broker).

    broker = InMemoryBroker()
    service = DataPrepService(settings, broker.bus(DataPrepService.name))
    await service.start()
    await broker.publish(ev.DatasetReady(...), msg_id="r1")
    (prepared,) = await broker.wait_for(subjects.DATASET_PREPARED, 1)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from google.protobuf.message import Message

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

M = TypeVar("M", bound=Message)


class MemoryKeyValue:
    """A key-value bucket in a dict."""

    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}

    async def get(self, key: str) -> bytes | None:
        return self.entries.get(key)

    async def put(self, key: str, value: bytes) -> None:
        self.entries[key] = bytes(value)

    async def delete(self, key: str) -> None:
        self.entries.pop(key, None)

    async def put_if_absent(self, key: str, value: bytes) -> bytes:
        return self.entries.setdefault(key, bytes(value))

    async def keys(self) -> list[str]:
        return list(self.entries)


@dataclass(slots=True)
class StoredMessage:
    """One message in the broker's log, in publish order (a stream)."""

    subject: str
    data: bytes
    headers: dict[str, str]
    seq: int

    def decode(self, subject: Subject[M]) -> M:
        return subject.decode(self.data)


@dataclass(slots=True)
class _Consumer:
    subscription: Subscription
    dispatcher: Dispatcher
    queue: asyncio.Queue[tuple[StoredMessage, int]] = field(default_factory=asyncio.Queue)
    outcomes: list[Outcome] = field(default_factory=list)


class InMemoryBroker:
    """The shared state of several in-memory buses: one stream, key-value buckets, consumers."""

    def __init__(self) -> None:
        self.log: list[StoredMessage] = []
        self.dead_letters: list[StoredMessage] = []
        self.buckets: dict[str, MemoryKeyValue] = {}
        self._seen_ids: set[str] = set()
        self._consumers: dict[str, _Consumer] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Condition()
        self._busy = 0

    def bus(self, service: str) -> InMemoryBus:
        return InMemoryBus(service, self)

    def key_value(self, bucket: Bucket) -> MemoryKeyValue:
        return self.buckets.setdefault(bucket, MemoryKeyValue())

    async def publish(self, event: Message, *, msg_id: str,
                      headers: Mapping[str, str] | None = None) -> None:
        """Publish as an outside client would (the CLI, a test)."""
        subject = subjects.for_message(event).for_tenant(str(getattr(event, "tenant", "")))
        await self.append(subject, event.SerializeToString(),
                          event_headers(event, msg_id=msg_id, extra=headers))

    async def append(self, subject: str, data: bytes, headers: Mapping[str, str]) -> None:
        """Store a message (dropping a repeated message id) and hand it to its consumers."""
        msg_id = headers.get(Header.MSG_ID, "")
        if msg_id and msg_id in self._seen_ids:
            return
        if msg_id:
            self._seen_ids.add(msg_id)
        stored = StoredMessage(subject, bytes(data), dict(headers), len(self.log) + 1)
        if subject.startswith(subjects.DEAD_LETTER_PREFIX + "."):
            self.dead_letters.append(stored)
        else:
            self.log.append(stored)
            for consumer in self._consumers.values():
                if consumer.subscription.subject.matches(subject):
                    consumer.queue.put_nowait((stored, 1))
        await self._notify()

    def consume(self, subscription: Subscription, dispatcher: Dispatcher) -> None:
        """One durable consumer: replicas sharing a durable share its queue."""
        if subscription.durable in self._consumers:
            return
        consumer = _Consumer(subscription, dispatcher)
        self._consumers[subscription.durable] = consumer
        for stored in self.log:  # deliver policy ALL, as on JetStream
            if subscription.subject.matches(stored.subject):
                consumer.queue.put_nowait((stored, 1))
        self._tasks.append(asyncio.create_task(self._deliver(consumer)))

    async def _deliver(self, consumer: _Consumer) -> None:
        sub = consumer.subscription
        while True:
            stored, deliveries = await consumer.queue.get()
            self._busy += 1
            try:
                outcome = await consumer.dispatcher.handle(sub, RawMessage(
                    data=stored.data, headers=dict(stored.headers), deliveries=deliveries,
                    stream_seq=stored.seq, subject=stored.subject))
                consumer.outcomes.append(outcome)
                if outcome is Outcome.RETRIED:
                    asyncio.get_running_loop().call_later(
                        retry_delay_s(deliveries) / 100, consumer.queue.put_nowait,
                        (stored, deliveries + 1))
            finally:
                self._busy -= 1
                await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def events(self, subject: Subject[M], *, run_id: str | None = None) -> list[M]:
        """The events on `subject` so far, decoded, optionally of one run."""
        found = [m.decode(subject) for m in self.log if subject.matches(m.subject)]
        return [e for e in found if run_id is None or getattr(e, "run_id", "") == run_id]

    def messages(self, subject: Subject[Message], *, run_id: str | None = None
                 ) -> list[StoredMessage]:
        return [m for m in self.log if subject.matches(m.subject) and (
            run_id is None or m.headers.get(Header.RUN_ID) == run_id)]

    async def wait_for(self, subject: Subject[M], count: int, *, run_id: str | None = None,
                       timeout: float = 60.0) -> list[M]:
        """The first `count` events on `subject` (of `run_id`), waiting up to `timeout`."""

        def enough() -> bool:
            return len(self.events(subject, run_id=run_id)) >= count

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(enough), timeout)
            except TimeoutError:
                seen = len(self.events(subject, run_id=run_id))
                raise TimeoutError(f"saw {seen} of {count} {subject.name} events") from None
        return self.events(subject, run_id=run_id)[:count]

    async def settled(self, timeout: float = 60.0) -> None:
        """Wait until every consumer is idle with an empty queue."""

        def idle() -> bool:
            return self._busy == 0 and all(c.queue.empty() for c in self._consumers.values())

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(idle), timeout)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._consumers.clear()


class InMemoryBus:
    """One service's bus on an `InMemoryBroker`: the surface of `bus.EventBus`."""

    def __init__(self, service: str, broker: InMemoryBroker) -> None:
        self.service = service
        self.broker = broker
        self.dispatcher = Dispatcher(self)
        self._subscriptions: list[Subscription] = []

    async def publish(self, event: Message, *, msg_id: str,
                      headers: Mapping[str, str] | None = None) -> None:
        await self.broker.publish(event, msg_id=msg_id, headers=headers)

    async def publish_dead_letter(self, original: Subject[Message], data: bytes,
                                  headers: Mapping[str, str]) -> None:
        await self.broker.append(f"{subjects.DEAD_LETTER_PREFIX}.{self.service}", data, headers)

    def key_value(self, bucket: Bucket) -> MemoryKeyValue:
        return self.broker.key_value(bucket)

    def subscribe(self, subscription: Subscription) -> None:
        self._subscriptions.append(subscription)

    async def start(self) -> None:
        for sub in self._subscriptions:
            self.broker.consume(sub, self.dispatcher)

    async def close(self, *, grace_s: float = 60.0) -> None:
        """Nothing to disconnect; the broker's `close()` stops the consumers."""
