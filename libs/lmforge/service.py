"""The life of a service process: settings -> telemetry -> bus -> handlers -> run.

A service is a subclass of `Service` that registers its handlers on the bus;
its `__main__.py` is one line, `run(TheService)`. SIGTERM and SIGINT stop
fetching new events, let the event in hand finish (a trainer checkpoints and
hands back), flush the spans and exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from pathlib import Path
from typing import ClassVar

from lmforge.artifacts import ArtifactError, ArtifactStore
from lmforge.bus import EventBus, StageError
from lmforge.settings import ServiceSettings, load_settings
from lmforge.telemetry import setup_telemetry, shutdown_telemetry

log = logging.getLogger("lmforge.service")


class Service:
    """Base of every lmforge service. Subclasses set `name` and `Settings`."""

    name: ClassVar[str]
    Settings: ClassVar[type[ServiceSettings]] = ServiceSettings

    def __init__(self, settings: ServiceSettings, bus: EventBus) -> None:
        self.settings = settings
        self.bus = bus
        self.store = ArtifactStore(settings.artifacts_dir)
        # Set on SIGTERM; domain code running in worker threads polls it.
        self.stopping = threading.Event()

    def input_dirs(self, run_id: str, *refs) -> list[Path]:
        """The verified directories of a run's input artifacts.

        A missing or corrupt input is bad input for this run (StageError), not a
        reason to retry: the store will not heal itself.
        """
        try:
            return [self.store.get_dir(ref.digest) for ref in refs]
        except ArtifactError as exc:
            raise StageError(f"inputs of run {run_id}: {exc}") from None

    def register(self) -> None:
        """Decorate handlers with `self.bus.subscriber(...)`."""

    async def serve(self, stop: asyncio.Event) -> None:
        """Anything besides handlers (a gRPC server, a control loop); returns on stop."""
        await stop.wait()

    async def start(self) -> None:
        """Register the handlers and start consuming."""
        self.register()
        await self.bus.start()


async def _main(service_type: type[Service], settings: ServiceSettings) -> None:
    bus = EventBus(service_type.name, ack_wait_s=settings.ack_wait_s,
                   max_deliver=settings.max_deliver)
    await bus.connect(settings.nats_url)
    service = service_type(settings, bus)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        log.info("received %s; stopping after the work in hand", signal.Signals(signum).name)
        service.stopping.set()
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await service.start()
    log.info("%s consuming from %s", service_type.name, settings.nats_url)
    mark_ready()
    try:
        await service.serve(stop)
    finally:
        await bus.close()


def mark_ready() -> None:
    """Tell the supervisor this process consumes (it passes LMFORGE_READY_FILE)."""
    path = os.environ.get("LMFORGE_READY_FILE")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(str(os.getpid()))


def run(service_type: type[Service]) -> None:
    """Entry point of a service's `__main__.py`."""
    settings = load_settings(service_type.Settings)
    port = setup_telemetry(service_type.name, metrics_port=settings.metrics_port,
                           log_level=settings.log_level)
    log.info("metrics on :%s", port)
    try:
        asyncio.run(_main(service_type, settings))
    except ConnectionError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    finally:
        shutdown_telemetry()
