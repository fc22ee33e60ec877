"""What is deployed, and getting it loaded on this replica.

The `lmforge_deployments` key-value bucket is what the replicas of the gateway
share across scale-ups and restarts (`DeploymentBook`):

- `<model>`: the `model.exported` event of the model's current version, which
  every replica serves. A restarted or new replica expects these first (a
  request for one is "loading", never NOT_FOUND) and loads them while it
  consumes;
- `deployed/<model>/<digest>`: `model.deployed` was published for one run's
  version of the model. Each replica has its own durable consumer of
  `model.exported`, so a replica added later replays every export of the
  stream; those already recorded here are not new deployments and are not
  announced again, so `model.deployed` is once per run and version whatever
  the replica count and timing (the JetStream duplicate window is only 120 s).
  A replayed export that is no longer current is not loaded either.

`ModelLoader` loads exported models into the registry: one load at a time per
model version (a restore and a `model.exported` of the same version share it),
installed only if that version is still the one expected (a restore that ends
after a newer `model.exported` does not take the model back),
a failed load retried with backoff (1, 2, 4 … 60 s) while the model is
deployed, every failure logged once with its reason and counted in
`lmforge_gateway_model_load_failures_total`, and the models deployed but not
loaded here in `lmforge_gateway_models_pending` (and in KServe's
RepositoryIndex, with the reason). Neither class knows NATS: the bucket is a
`KeyValue` (JetStream on NATS, a dict in tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable

from prometheus_client import Counter, Gauge

from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import KeyValue
from services.inference_gateway.engines.base import Engine
from services.inference_gateway.registry import ModelRegistry

log = logging.getLogger("lmforge.gateway.deployments")

LOAD_FAILURES = Counter("lmforge_gateway_model_load_failures_total",
                        "Failed loads of a deployed model on this replica (each is retried "
                        "with backoff while the model is deployed).", ["model"])
PENDING = Gauge("lmforge_gateway_models_pending",
                "Models deployed but not loaded on this replica (loading, or waiting to retry "
                "a failed load); their requests are answered UNAVAILABLE with Retry-After.")

ANNOUNCED_PREFIX = "deployed/"
MAX_RETRY_S = 60.0


class ModelLoaderClosed(RuntimeError):
    """A load asked for once the gateway is stopping."""


def retry_after_s(failures: int) -> float:
    """Seconds before the next load of a model that failed to load `failures` times."""
    return min(2.0 ** (failures - 1), MAX_RETRY_S)


def _decode(data: bytes) -> ev.ModelExported:
    event = ev.ModelExported()
    event.ParseFromString(data)
    return event


class DeploymentBook:
    """The deployments bucket: each model's current version, and what was announced."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @staticmethod
    def announced_key(event: ev.ModelExported) -> str:
        digest = hashlib.sha256(f"{event.model_name}\n{event.version}\n{event.run_id}".encode())
        return f"{ANNOUNCED_PREFIX}{event.model_name}/{digest.hexdigest()[:32]}"

    async def current(self) -> list[ev.ModelExported]:
        """The current version of every deployed model."""
        found = []
        for key in sorted(await self.kv.keys()):
            if "/" in key:  # an announcement record, not a model
                continue
            data = await self.kv.get(key)
            if data is not None:
                found.append(_decode(data))
        return found

    async def current_of(self, model: str) -> ev.ModelExported | None:
        data = await self.kv.get(model)
        return None if data is None else _decode(data)

    async def announced(self, event: ev.ModelExported) -> bool:
        """Whether model.deployed was published for this run's version already (a
        deployment recorded before announcements were, counts by its current entry)."""
        if await self.kv.get(self.announced_key(event)) is not None:
            return True
        current = await self.current_of(event.model_name)
        return (current is not None and current.version == event.version
                and current.run_id == event.run_id)

    async def record_current(self, event: ev.ModelExported) -> None:
        await self.kv.put(event.model_name, event.SerializeToString())

    async def record_announced(self, event: ev.ModelExported) -> None:
        await self.kv.put(self.announced_key(event), event.SerializeToString())


class ModelLoader:
    """Loads exported models into the registry, retrying failed loads with backoff."""

    def __init__(self, registry: ModelRegistry,
                 build: Callable[[ev.ModelExported], Engine]) -> None:
        self.registry = registry
        self.build = build
        """Builds the engine of an export (blocking: it is run in a worker thread)."""
        self._loading: dict[tuple[str, str], asyncio.Task[bool]] = {}
        self._closed = False
        """The gateway is stopping: no load starts, and what one builds is closed."""

    async def load(self, event: ev.ModelExported) -> bool:
        """Load and install `event`'s version unless it is loaded (the caller expected it
        in the registry first); raises what the load raised (after recording the failure
        for the retries of `catch_up`). False: it loaded, but a newer version of the model
        was expected meanwhile, so it was not installed (and was closed).
        `ModelLoaderClosed`: the gateway is stopping (the export is not acknowledged)."""
        key = (event.model_name, event.version)
        if self.registry.loaded(*key):
            return True
        if self._closed:
            raise ModelLoaderClosed(f"not loading {key[0]} version {key[1]}: the gateway "
                                    f"is stopping")
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load(event), name=f"load {key[0]} {key[1]}")
            self._loading[key] = task
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(task)  # a waiter that goes away does not cancel it

    async def _load(self, event: ev.ModelExported) -> bool:
        name, version = event.model_name, event.version
        try:
            engine = await asyncio.to_thread(self.build, event)
        except Exception as exc:
            # Counted against this version only while it is still the one expected: a
            # failed restore of the version a newer model.exported replaced is not retried.
            pending = self.registry.pending().get(name)
            LOAD_FAILURES.labels(name).inc()
            if pending is not None and pending.version == version:
                pending.attempts += 1
                pending.last_error = f"{type(exc).__name__}: {exc}"
                delay = retry_after_s(pending.attempts)
                pending.retry_at = time.monotonic() + delay
                log.warning("could not load model %s version %s (run %s), attempt %d: %s; "
                            "retrying in %.0f s while it is deployed", name, version,
                            event.run_id, pending.attempts, pending.last_error, delay)
            self._count_pending()
            raise
        if self._closed:  # stopped while it built: nothing else would close it
            await asyncio.to_thread(engine.close)
            log.info("loaded model %s version %s (run %s) while the gateway stopped: "
                     "closed, not served", name, version, event.run_id)
            raise ModelLoaderClosed(f"{name} version {version} loaded while the gateway "
                                    f"stopped: closed, not served")
        if not self.registry.install_expected(name, engine):
            engine.close()
            pending = self.registry.pending().get(name)
            log.info("loaded model %s version %s (run %s), but not installed: version %s "
                     "was deployed while it loaded", name, version, event.run_id,
                     pending.version if pending else self.registry.version(name))
            return False
        self._count_pending()
        log.info("serving %s version %s (run %s)", name, version, event.run_id)
        return True

    async def close(self) -> None:
        """The gateway is stopping: start no load, and wait for those in flight, closing
        what they build. A build runs in a thread that cannot be cancelled; cancelling
        only its waiter (the restore) used to leave its engine, a process once built,
        to nobody. Call before `ModelRegistry.close`, which closes what is installed."""
        self._closed = True
        loading = list(self._loading.values())
        if not loading:
            return
        log.info("waiting for %d model load(s) in flight to finish, to close what they "
                 "build: %s", len(loading), sorted(f"{n} {v}" for n, v in self._loading))
        await asyncio.gather(*(asyncio.shield(t) for t in loading), return_exceptions=True)

    def expect(self, deployed: list[ev.ModelExported]) -> None:
        """Record every deployed version as expected here, before any is loaded: a request
        for one is answered `ModelLoading` (retry) until it is, never NOT_FOUND."""
        for event in deployed:
            self.registry.assign_tenant(event.model_name, event.tenant)
            self.registry.expect(event.model_name, event.version)
        self._count_pending()

    async def catch_up(self, deployed: list[ev.ModelExported], *,
                       read_at: int | None = None) -> None:
        """Load each deployed version that is not loaded here and is due (never tried, or
        its backoff has passed); a failure waits for a later call. Never raises.

        `read_at` is `registry.installs` from before `deployed` was read: a model installed
        since (a newer version deployed here meanwhile) is not taken back to what was read.
        Nor is a model whose other version is loading now (a `model.exported` handled
        meanwhile): the bucket read may predate it, and the next read shows what it became.
        The bucket says whose a model is, so a model still loading is hidden from other
        tenants (NOT_FOUND, not "loading") as a loaded one is.
        """
        now = time.monotonic()
        for event in deployed:
            if read_at is not None and self.registry.installed_since(event.model_name, read_at):
                continue
            if any(name == event.model_name and version != event.version
                   for name, version in self._loading):
                continue
            self.registry.assign_tenant(event.model_name, event.tenant)
            pending = self.registry.expect(event.model_name, event.version)
            if pending is None or pending.retry_at > now:
                continue
            # A failure is recorded, logged and counted by _load, and retried later.
            with contextlib.suppress(Exception):
                await self.load(event)
        self._count_pending()

    def next_retry_s(self) -> float | None:
        """Seconds until the next retry of a failed load is due; None when no load failed
        (a model pending without a failure is being loaded now)."""
        failed = [p.retry_at for p in self.registry.pending().values() if p.attempts]
        if not failed:
            return None
        return max(0.0, min(failed) - time.monotonic())

    def _count_pending(self) -> None:
        PENDING.set(len(self.registry.pending()))
