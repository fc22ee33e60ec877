"""Test helpers: run a service in-process against a real nats-server, read events back."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager

from lmforge.bus import EventBus
from lmforge.contracts import subjects
from lmforge.service import Service


@contextlib.contextmanager
def serving_in_a_thread(serve: Callable[[], AbstractAsyncContextManager[object]], *,
                        timeout_s: float = 60) -> Iterator[None]:
    """Hold `serve()` open in its own event loop on a thread until the block ends: for
    fixtures whose tests run the CLI, which runs an event loop of its own. A failure to
    start is raised here, not lost in the thread."""
    stop, ready = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    async def hold() -> None:
        async with serve():
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)

    def run() -> None:
        try:
            asyncio.run(hold())
        except BaseException as exc:
            failed.append(exc)
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert ready.wait(timeout_s) and not failed, failed
        yield
    finally:
        stop.set()
        thread.join(timeout_s)


@contextlib.asynccontextmanager
async def in_process_service(service_type: type[Service], nats_url: str, **settings
                             ) -> AsyncIterator[Service]:
    """The service's real handlers on a real bus, in this event loop."""
    config = service_type.Settings(nats_url=nats_url, **settings)
    bus = EventBus(service_type.name)
    await bus.connect(nats_url, auth=config.nats_auth())
    service = service_type(config, bus)
    await service.start()
    stop = asyncio.Event()
    serving = asyncio.create_task(service.serve(stop))
    try:
        yield service
    finally:
        stop.set()
        service.stopping.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 30)
        await bus.close(grace_s=30)


async def wait_for_events(nats_url: str, subject: subjects.Subject, count: int,
                          timeout: float = 60.0, run_id: str | None = None) -> list:
    """The first `count` events on `subject` (from the start of the stream)."""
    bus = EventBus("test-reader")
    await bus.connect(nats_url)
    sub = await bus.js.subscribe(subject.name, ordered_consumer=True)
    found = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while len(found) < count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"saw {len(found)} of {count} {subject.name} events")
            try:
                msg = await sub.next_msg(timeout=remaining)
            except Exception as exc:
                raise TimeoutError(f"saw {len(found)} of {count} {subject.name} events") from exc
            event = subject.decode(msg.data)
            if run_id is None or event.run_id == run_id:
                found.append(event)
    finally:
        await sub.unsubscribe()
        await bus.close()
    return found


async def count_events(nats_url: str, subject: subjects.Subject) -> int:
    bus = EventBus("test-reader")
    await bus.connect(nats_url)
    info = await bus.js.stream_info(subjects.STREAM, subjects_filter=subject.name)
    await bus.close()
    return (info.state.subjects or {}).get(subject.name, 0)


async def publish(nats_url: str, event, msg_id: str) -> None:
    bus = EventBus("test-publisher")
    await bus.connect(nats_url)
    await bus.publish(event, msg_id=msg_id)
    await bus.close()


async def start_gateway(registry, *, serving: bool = False, max_new_tokens: int = 64,
                        max_concurrency: int = 2, max_queue: int = 4,
                        max_prompt_chars: int = 1000, max_message_bytes: int = 1 << 20):
    """The real gRPC gateway (Generate, KServe v2, health) on 127.0.0.1, any free port."""
    from services.inference_gateway.api.server import GatewayServer
    from services.inference_gateway.frontend import GenerationFrontend, Limits

    frontend = GenerationFrontend(registry, Limits(
        max_new_tokens=max_new_tokens, max_concurrency=max_concurrency, max_queue=max_queue,
        max_prompt_chars=max_prompt_chars))
    server = GatewayServer(frontend, host="127.0.0.1", port=0,
                           max_message_bytes=max_message_bytes)
    await server.start()
    if serving:
        await server.set_serving(True)
    return server
