"""The life of a service process: settings -> telemetry -> bus -> handlers -> run.

A service is a subclass of `Service[TheSettings]` whose handlers are methods
declared with `@subscriber(SUBJECT)`; its `__main__.py` is one line,
`run(TheService)`. The same service runs on the NATS bus in production and on
the in-memory bus of `lmforge.testing` in unit tests. SIGTERM and SIGINT stop
fetching new events, let the event in hand finish (a trainer checkpoints and
hands back), flush the spans and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar, cast

from google.protobuf.message import Message

from lmforge.artifacts import ArtifactError
from lmforge.contracts import names
from lmforge.contracts.names import Bucket
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import (
    KeyValue,
    Outputs,
    Subscription,
    SubscriptionOptions,
    Transport,
    declared_options,
)
from lmforge.failures import BadInput
from lmforge.probes import HEALTH
from lmforge.settings import ServiceSettings, load_settings
from lmforge.telemetry import setup_telemetry, shutdown_telemetry

log = logging.getLogger("lmforge.service")

SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


class Bus(Transport, Protocol):
    """A transport that consumes: the NATS `EventBus` or the in-memory test bus."""

    def subscribe(self, subscription: Subscription) -> None: ...
    async def start(self) -> None: ...

    def key_value(self, bucket: Bucket) -> KeyValue: ...


_PLATFORM_FIELDS = frozenset(ServiceSettings.model_fields)


class Service(Generic[SettingsT]):
    """Base of every lmforge service. Subclasses set `name` and `Settings`."""

    name: ClassVar[names.ServiceName]
    Settings: ClassVar[type[ServiceSettings]] = ServiceSettings

    def __init__(self, settings: SettingsT, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.store = settings.artifact_store()
        # Set on SIGTERM; domain code running in worker threads polls it.
        self.stopping = threading.Event()

    def input_dirs(self, run_id: str, *refs: ev.ArtifactRef) -> list[Path]:
        """The verified directories of a run's input artifacts.

        A missing or corrupt input is bad input for this run, not a reason to
        retry: the store will not heal itself.
        """
        try:
            return [self.store.get_dir(ref.digest) for ref in refs]
        except ArtifactError as exc:
            raise BadInput(f"inputs of run {run_id}: {exc}") from None

    # -- the stage cache ------------------------------------------------------------

    def stage_config(self) -> Mapping[str, object]:
        """The settings that shape this stage's outputs (part of the stage cache key).

        By default every setting of the service's own; the platform's (URLs,
        ports, directories, replica index) never change what a stage produces.
        """
        return {k: v for k, v in self.settings.model_dump(mode="json").items()
                if k not in _PLATFORM_FIELDS}

    async def stage_inputs(self, event: Message) -> bytes:
        """What this stage reads, as bytes: the event without its run id and model name.

        Past data-prep, every input is an artifact named by digest inside the
        event, so the event is the inputs. data-prep overrides this with the
        digest of the dataset's contents, so a touched or copied file is a hit.
        """
        inputs = type(event)()
        inputs.CopyFrom(event)
        for field in ("run_id", "model_name"):
            if field in inputs.DESCRIPTOR.fields_by_name:
                inputs.ClearField(field)
        return inputs.SerializeToString(deterministic=True)

    async def stage_cache_key(self, event: Message) -> str:
        digest = hashlib.sha256()
        digest.update(type(event).__name__.encode())
        digest.update(json.dumps(self.stage_config(), sort_keys=True, default=str).encode())
        digest.update(await self.stage_inputs(event))
        return digest.hexdigest()[:48]

    # -- life cycle -----------------------------------------------------------------

    def subscriptions(self) -> list[Subscription]:
        """The handlers declared with `@subscriber`, bound to this service."""
        found: list[Subscription] = []
        for attr, member in inspect.getmembers(type(self)):
            options = declared_options(member)
            if options is not None:
                found.append(self._bind(options, getattr(self, attr)))
        return found

    def _bind(self, options: SubscriptionOptions,
              handler: Callable[[Message, Any], Awaitable[Outputs]]) -> Subscription:
        consumed = names.CONSUMES.get(self.name, ())
        if options.subject not in consumed:
            raise TypeError(f"{self.name} handles {options.subject.name}, which the name "
                            f"catalog does not list among its inputs ({consumed})")
        replica = self.settings.replica if options.per_replica else None
        return Subscription(
            subject=options.subject, handler=handler,
            durable=names.durable_name(self.name, options.subject, replica=replica),
            ack_wait_s=options.ack_wait_s or self.settings.ack_wait_s,
            max_deliver=options.max_deliver or self.settings.max_deliver,
            idempotent=options.idempotent, cache_outputs=options.cache_outputs,
            cache_key=self.stage_cache_key if options.cache_outputs else None)

    async def serve(self, stop: asyncio.Event) -> None:
        """Anything besides handlers (a gRPC server, a control loop); returns on stop."""
        await stop.wait()

    async def start(self) -> None:
        """Register the handlers and start consuming."""
        for subscription in self.subscriptions():
            self.bus.subscribe(subscription)
        await self.bus.start()


S = TypeVar("S", bound=ServiceSettings)


async def _main(service_type: type[Service[S]], settings: S) -> None:
    from lmforge.bus import EventBus

    bus = EventBus(service_type.name)
    await bus.connect(settings.nats_url, stream_replicas=settings.stream_replicas,
                      auth=settings.nats_auth())
    service = service_type(settings, bus)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        log.info("received %s; stopping after the work in hand", signal.Signals(signum).name)
        HEALTH.set_not_ready(f"draining after {signal.Signals(signum).name}")
        service.stopping.set()
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    heartbeat = asyncio.create_task(beat_while_alive(stop))
    HEALTH.require("nats", lambda: bus.nc is not None and bus.nc.is_connected)
    await service.start()
    log.info("%s consuming from %s", service_type.name, settings.nats_url)
    mark_ready()
    try:
        await service.serve(stop)
    finally:
        heartbeat.cancel()
        await bus.close()


async def beat_while_alive(stop: asyncio.Event, *, every_s: float = 5.0) -> None:
    """Tell /healthz the event loop still runs: a wedged loop stops beating."""
    while not stop.is_set():
        HEALTH.beat()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_s)


def mark_ready() -> None:
    """Tell /readyz, and the supervisor (it passes LMFORGE_READY_FILE), that this consumes."""
    HEALTH.set_ready()
    path = os.environ.get("LMFORGE_READY_FILE")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(str(os.getpid()))


def run(service_type: type[Service[S]]) -> None:
    """Entry point of a service's `__main__.py`."""
    # `Settings` is the class the service declared for S; the ClassVar cannot say so.
    settings = cast(S, load_settings(service_type.Settings))
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
