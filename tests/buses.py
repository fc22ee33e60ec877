"""One handler test, two buses: in memory (unit tier) and a real nats-server (`connected`).

A test takes the `bus_kind` fixture (parametrised in conftest.py) and opens a
`Harness`: it runs services' real handlers in this event loop, publishes as an
outside client would, and reads events back, the same way on both buses.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol, TypeVar

from google.protobuf.message import Message

from lmforge.bus import EventBus
from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket, Header
from lmforge.contracts.subjects import Subject
from lmforge.service import Service
from lmforge.testing import InMemoryBroker
from tests.helpers import in_process_service

M = TypeVar("M", bound=Message)


class Harness(Protocol):
    def service(self, service_type: type[Service[Any]], **settings: Any
                ) -> contextlib.AbstractAsyncContextManager[Service[Any]]: ...
    async def publish(self, event: Message, msg_id: str) -> None: ...
    async def publish_raw(self, subject: str, data: bytes, headers: dict[str, str]) -> None: ...
    async def wait_for(self, subject: Subject[M], count: int, *, run_id: str | None = None,
                       timeout: float = 60.0) -> list[M]: ...
    async def headers(self, subject: Subject[Message], run_id: str) -> list[dict[str, str]]: ...
    async def count(self, subject: Subject[Message]) -> int: ...
    async def dead_letters(self, service: str) -> list[tuple[bytes, dict[str, str]]]: ...
    async def kv_get(self, bucket: Bucket, key: str) -> bytes | None: ...


class MemoryHarness:
    """Services on `lmforge.testing.InMemoryBroker`."""

    def __init__(self) -> None:
        self.broker = InMemoryBroker()
        self._open = 0

    @contextlib.asynccontextmanager
    async def service(self, service_type: type[Service[Any]], **settings: Any
                      ) -> AsyncIterator[Service[Any]]:
        config = service_type.Settings(nats_url="nats://unused:1", **settings)
        service = service_type(config, self.broker.bus(service_type.name))
        await service.start()
        stop = asyncio.Event()
        serving = asyncio.create_task(service.serve(stop))
        self._open += 1
        try:
            yield service
        finally:
            stop.set()
            service.stopping.set()
            self._open -= 1
            if not self._open:  # the last service out stops the consumers
                await self.broker.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(serving, 30)

    async def publish(self, event: Message, msg_id: str) -> None:
        await self.broker.publish(event, msg_id=msg_id)

    async def publish_raw(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        await self.broker.append(subject, data, headers)

    async def wait_for(self, subject: Subject[M], count: int, *, run_id: str | None = None,
                       timeout: float = 60.0) -> list[M]:
        return await self.broker.wait_for(subject, count, run_id=run_id, timeout=timeout)

    async def headers(self, subject: Subject[Message], run_id: str) -> list[dict[str, str]]:
        return [m.headers for m in self.broker.messages(subject, run_id=run_id)]

    async def count(self, subject: Subject[Message]) -> int:
        await self.broker.settled()
        return len(self.broker.messages(subject))

    async def dead_letters(self, service: str) -> list[tuple[bytes, dict[str, str]]]:
        prefix = f"{subjects.DEAD_LETTER_PREFIX}.{service}"
        return [(m.data, m.headers) for m in self.broker.dead_letters if m.subject == prefix]

    async def kv_get(self, bucket: Bucket, key: str) -> bytes | None:
        return await self.broker.key_value(bucket).get(key)


class NatsHarness:
    """Services on a real nats-server (the `nats_server` fixture)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: EventBus | None = None

    async def client(self) -> EventBus:
        if self._client is None:
            self._client = EventBus("test-client")
            await self._client.connect(self.url)
        return self._client

    @contextlib.asynccontextmanager
    async def service(self, service_type: type[Service[Any]], **settings: Any
                      ) -> AsyncIterator[Service[Any]]:
        try:
            async with in_process_service(service_type, self.url, **settings) as service:
                yield service
        finally:
            if self._client is not None:
                await self._client.close()
                self._client = None

    async def publish(self, event: Message, msg_id: str) -> None:
        await (await self.client()).publish(event, msg_id=msg_id)

    async def publish_raw(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        await (await self.client()).js.publish(subject, data, headers=headers)

    async def _read(self, subject: str, until: int, timeout: float
                    ) -> list[tuple[bytes, dict[str, str]]]:
        js = (await self.client()).js
        sub = await js.subscribe(subject, ordered_consumer=True)
        found: list[tuple[bytes, dict[str, str]]] = []
        try:
            while len(found) < until:
                try:
                    msg = await sub.next_msg(timeout=timeout)
                except Exception:
                    break
                found.append((msg.data, dict(msg.headers or {})))
        finally:
            await sub.unsubscribe()
        return found

    async def wait_for(self, subject: Subject[M], count: int, *, run_id: str | None = None,
                       timeout: float = 60.0) -> list[M]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = [subject.decode(data) for data, headers in
                     await self._read(subject.name, 1 << 30, 0.5)
                     if run_id is None or headers.get(Header.RUN_ID) == run_id]
            if len(found) >= count:
                return found[:count]
            if loop.time() > deadline:
                raise TimeoutError(f"saw {len(found)} of {count} {subject.name} events")
            await asyncio.sleep(0.2)

    async def headers(self, subject: Subject[Message], run_id: str) -> list[dict[str, str]]:
        return [h for _, h in await self._read(subject.name, 1 << 30, 0.5)
                if h.get(Header.RUN_ID) == run_id]

    async def count(self, subject: Subject[Message]) -> int:
        await asyncio.sleep(0.5)
        info = await (await self.client()).js.stream_info(subjects.STREAM,
                                                           subjects_filter=subject.name)
        return (info.state.subjects or {}).get(subject.name, 0)

    async def dead_letters(self, service: str) -> list[tuple[bytes, dict[str, str]]]:
        return await self._read(f"{subjects.DEAD_LETTER_PREFIX}.{service}", 1 << 30, 0.5)

    async def kv_get(self, bucket: Bucket, key: str) -> bytes | None:
        return await (await self.client()).key_value(bucket).get(key)
