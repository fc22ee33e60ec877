"""inference-gateway's bus wiring and serving loop.

model.exported -> load the exported hf/ directory -> swap it in -> model.deployed.

What is deployed is recorded in the `lmforge_deployments` key-value bucket
(deployments.py), which makes the replicas of the gateway agree:

- start-up: a replica reads what is deployed, marks it "loading", consumes at
  once, and loads the models in the background, one at a time: how soon a
  restarted replica consumes does not grow with the number of models (it
  waited for every load before: over 120 s with 15-18 models in the chaos
  run). Until a model is loaded its requests are UNAVAILABLE / 503 with
  Retry-After, never NOT_FOUND; gRPC health says NOT_SERVING until every
  deployed model was tried once, while /readyz (the supervisor's "running")
  means "consumes". A replica that finds another one listening on the shared
  ports (SO_REUSEPORT) binds them only once it has restored, so it takes no
  share of their clients while loading; alone, it binds at once; finding
  something that is not a replica there (no gateway health answer, or not this
  gateway's TLS certificate), it fails at once. A restore never takes a model
  back: a newer version deployed meanwhile wins, and one load is shared by a
  restore and a `model.exported` of the same version. A model that failed to
  load is retried with backoff in the background;
- model.exported: every replica loads every model (a durable consumer per
  replica), but `model.deployed` is published once per run and version: a
  replica added later replays the stream on its new durable, and what the
  bucket records as announced is loaded if current, never announced again;
- while serving, the bucket is read every few seconds, so a model deployed by
  another replica first is UNAVAILABLE here (not NOT_FOUND) until it is loaded;
- shutdown: the servers stop, a load in flight is waited for (its build cannot
  be interrupted) and what it built closed, then every engine process is
  stopped and reaped, and none is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import torch
from prometheus_client import Gauge

from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket, ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import Delivery, subscriber
from lmforge.failures import BadInput
from lmforge.security.api_keys import ApiKeyBook
from lmforge.service import Service
from services.inference_gateway.access import TLS_ON, AccessControl
from services.inference_gateway.api.guard import RequireApiKey, http_guard
from services.inference_gateway.api.openai import OpenAIServer
from services.inference_gateway.api.server import GatewayServer, PortHolder, who_listens
from services.inference_gateway.api.tls import grpc_credentials, http_ssl_context
from services.inference_gateway.deployments import DeploymentBook, ModelLoader
from services.inference_gateway.engines import (
    Engine,
    RemoteTritonEngine,
    build_engine,
    exported_task_eval,
    import_engine_modules,
    served_precision,
)
from services.inference_gateway.frontend import GenerationFrontend, Limits
from services.inference_gateway.registry import ModelRegistry
from services.inference_gateway.settings import GatewaySettings

log = logging.getLogger("lmforge.gateway")

RESTORING = Gauge("lmforge_gateway_restoring",
                  "1 while a starting replica loads the models deployed before it started "
                  "(it consumes meanwhile; one that found another replica on the shared "
                  "ports joins them after). Labelled by replica index: replicas in one "
                  "process (tests) each have their own.", ["replica"])
FOLLOW_S = 2.0
"""Seconds between reads of the deployments bucket while serving."""
READ_TIMEOUT_S = 10.0


class GatewayService(Service[GatewaySettings]):
    name = ServiceName.INFERENCE_GATEWAY
    Settings = GatewaySettings

    def __init__(self, settings, bus) -> None:
        super().__init__(settings, bus)
        s: GatewaySettings = settings
        # Before any thread: a lazy import raced by two threads (a restore and a
        # model.exported) fails with "cannot import name 'PreTrainedTokenizerFast'".
        import_engine_modules(s)
        torch.set_num_threads(s.engine_threads)
        self.registry = ModelRegistry()
        self.frontend = GenerationFrontend(self.registry, Limits(
                max_new_tokens=s.gateway_max_new_tokens,
                max_concurrency=s.max_generating,
                max_queue=s.gateway_max_queue,
                max_prompt_chars=s.gateway_max_prompt_chars))
        self.access = AccessControl(ApiKeyBook(bus.key_value(Bucket.API_KEYS)),
                                    rate_per_s=s.gateway_rate_per_s, burst=s.gateway_burst,
                                    refresh_s=s.gateway_keys_refresh_s)
        self.server = GatewayServer(self.frontend, host=s.gateway_host, port=s.gateway_port,
                                    max_message_bytes=s.gateway_max_message_bytes,
                                    interceptors=[RequireApiKey(self.access)],
                                    credentials=grpc_credentials(s))
        self.http = (OpenAIServer(self.frontend, host=s.gateway_http_host,
                                  port=s.gateway_http_port,
                                  max_body_bytes=s.gateway_max_message_bytes,
                                  middlewares=[http_guard(self.access)],
                                  ssl_context=http_ssl_context(s))
                     if s.gateway_http else None)
        self.book = DeploymentBook(bus.key_value(Bucket.DEPLOYMENTS))
        self.loader = ModelLoader(self.registry, self._build)
        self._deployments_changed = asyncio.Event()
        self._restore: asyncio.Task[None] | None = None
        """Loading what the bucket said was deployed at start-up (None: not started)."""
        self.restoring = True
        """Whether the start-up restore has not tried every deployed model yet."""
        self._restoring_gauge = RESTORING.labels(str(s.replica))

    @property
    def endpoint(self) -> str:
        """host:port written into model.deployed (the bound port once started)."""
        s = self.settings
        return s.gateway_advertise or f"{s.gateway_host}:{self.server.port}"

    def _build(self, event: ev.ModelExported) -> Engine:
        """The engine of an exported model (verifies the artifact, then loads it)."""
        owner = self.registry.tenant_of(event.model_name)
        if owner and owner != event.tenant:
            raise BadInput(f"model name {event.model_name!r} is taken by another tenant; "
                           f"choose another --model-name")
        self.registry.assign_tenant(event.model_name, event.tenant)
        (export_dir,) = self.input_dirs(event.run_id, event.export)
        engine = build_engine(self.settings, export_dir, event.version)
        precision, reason = served_precision(self.settings, export_dir, engine.int4_report)
        self.registry.record_precision(event.model_name, event.version, precision, reason)
        self.registry.record_task_eval(event.model_name, event.version,
                                       exported_task_eval(export_dir))
        log.info("model %s version %s is served at %s%s", event.model_name, event.version,
                 precision, f" ({reason})" if reason else "")
        return engine

    async def _say_serving(self) -> None:
        """gRPC health (the Kubernetes readiness probe): SERVING once the start-up restore
        is over and some model is loaded; per model, KServe ModelReady and RepositoryIndex
        (LOADING) say which are loaded while it runs."""
        await self.server.set_serving(not self.restoring and bool(self.registry.names()))

    # -- model.exported -------------------------------------------------------------

    @subscriber(subjects.MODEL_EXPORTED, per_replica=True)
    async def on_exported(self, event: ev.ModelExported, delivery: Delivery) -> None:
        if await self.book.announced(event):
            await self._catch_up_with(event)
            return
        self.registry.expect(event.model_name, event.version)
        try:
            installed = await self.loader.load(event)
        except Exception:
            current = await self.book.current_of(event.model_name)
            if current is None or current.version != event.version:
                self.registry.forget(event.model_name, event.version)  # not deployed
            raise  # retried, then dead-lettered with a stage.failed (dispatch.py)
        if not installed:  # the follower saw a newer version, deployed by another replica
            log.info("model.exported of run %s (%s version %s) was replaced while it "
                     "loaded: not served, not announced", event.run_id, event.model_name,
                     event.version)
            return
        await self._say_serving()
        await self.book.record_current(event)
        # Published here so that it is recorded as announced only once it is out: a
        # replica that dies in between publishes again, under the same message id.
        precision, reason = self.registry.precision(event.model_name, event.version)
        await delivery.publish(ev.ModelDeployed(
            run_id=event.run_id, model_name=event.model_name, version=event.version,
            endpoint=self.endpoint, backend=self.settings.gateway_backend,
            precision=precision, precision_reason=reason))
        await self.book.record_announced(event)

    async def _catch_up_with(self, event: ev.ModelExported) -> None:
        """An export announced before (a replay on a new replica's durable, a redelivery):
        loaded here if it is still current, by the follower (with its retries)."""
        current = await self.book.current_of(event.model_name)
        if current is not None and current.version == event.version:
            if self.registry.expect(event.model_name, event.version) is not None:
                self._deployments_changed.set()
            return
        log.info("model.exported of run %s (%s version %s) was deployed before and has "
                 "been replaced since: not loaded, not announced again", event.run_id,
                 event.model_name, event.version)

    # -- deployed models ------------------------------------------------------------

    async def _restore_deployments(self, deployed: list[ev.ModelExported],
                                   read_at: int, join_after: bool) -> None:
        """Load what the bucket said was deployed at start-up, one model at a time, while
        the replica consumes; a failed load is retried by `_follow_deployments`. A replica
        that found another one on the shared ports joins them only now (`join_after`)."""
        started = time.monotonic()
        log.info("restoring %d deployed model(s) while consuming: %s", len(deployed),
                 [e.model_name for e in deployed])
        await self.loader.catch_up(deployed, read_at=read_at)
        pending = self.registry.pending()
        for name, model in pending.items():
            log.warning("restored without model %s: %s", name, model.describe())
        log.info("restored %d of %d deployed model(s) in %.1f s",
                 sum(e.model_name not in pending for e in deployed), len(deployed),
                 time.monotonic() - started)
        self.restoring = False
        if join_after:
            await self._join_ports()
        await self._say_serving()
        self._restoring_gauge.set(0)
        self._deployments_changed.set()  # the follower retries what failed

    async def _follow_deployments(self, stop: asyncio.Event) -> None:
        """Keep what is loaded here in step with the bucket: models another replica
        deployed first are UNAVAILABLE (not NOT_FOUND) until loaded; failed loads are
        retried when their backoff is over."""
        failing = ""
        while not stop.is_set():
            due = self.loader.next_retry_s()
            wait = FOLLOW_S if due is None else min(FOLLOW_S, due)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._deployments_changed.wait(), wait)
            self._deployments_changed.clear()
            if self.restoring:  # it loads what the bucket said; a retry waits for it
                continue
            mark = self.registry.installs
            try:
                deployed = await asyncio.wait_for(self.book.current(), READ_TIMEOUT_S)
            except Exception as exc:  # NATS restarting: the bus logs the connection
                reason = f"{type(exc).__name__}: {exc}"
                if reason != failing:
                    log.warning("cannot read the deployments bucket (%s); trying again",
                                reason)
                failing = reason
                continue
            if failing:
                log.info("reading the deployments bucket again")
                failing = ""
            await self.loader.catch_up(deployed, read_at=mark)
            await self._say_serving()

    def _install_remote_models(self) -> None:
        for remote in self.settings.gateway_remote_models:
            self.registry.install(remote.name, RemoteTritonEngine(remote))
            log.info("serving %s from %s (remote model %s)", remote.name, remote.url,
                     remote.remote_model)

    # -- life cycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Read what is deployed, consume, and load it in the background: how soon a
        restarted replica consumes does not grow with the number of deployed models.

        Until a deployed model is loaded its requests are `ModelLoading` (UNAVAILABLE, 503
        with Retry-After). A replica that finds another one serving on the shared ports
        joins them only once it has restored (the kernel would hand it a share of their
        clients); one that finds the ports free binds now, so its clients hear "loading"
        and not "connection refused".
        """
        await self.access.refresh()
        self._refuse_unprotected_exposure()
        TLS_ON.set(1 if self.settings.tls else 0)
        self._install_remote_models()
        deployed = await self.book.current()
        self.loader.expect(deployed)
        self._restoring_gauge.set(1)
        mark = self.registry.installs
        s = self.settings
        found = await who_listens(s.gateway_host, s.gateway_port, tls_cert=s.gateway_tls_cert,
                                  tls_key=s.gateway_tls_key)
        if found.holder is PortHolder.OTHER:
            log.error("port %d (%s) is taken by something that is not an lmforge gateway "
                      "(%s): stop it or choose another LMFORGE_GATEWAY_PORT", s.gateway_port,
                      s.gateway_host, found.detail)
            raise SystemExit(2)
        join_after = bool(deployed) and found.holder is PortHolder.REPLICA
        if join_after:
            log.info("another replica serves on port %d: joining it once the %d deployed "
                     "model(s) are restored", s.gateway_port, len(deployed))
        else:
            await self._join_ports()
        await super().start()
        self._restore = asyncio.create_task(
            self._restore_deployments(deployed, mark, join_after), name="restore")

    async def _join_ports(self) -> None:
        """Bind the shared gRPC and HTTP ports and serve."""
        await self.server.start()
        await self._say_serving()
        log.info("gRPC gateway on %s serving %s%s", self.endpoint, self.registry.names(),
                 f"; loading {sorted(self.registry.pending())}" if self.registry.pending()
                 else "")
        if self.http is not None:
            port = await self.http.start()
            log.info("OpenAI-compatible HTTP on %s:%d/v1", self.settings.gateway_http_host, port)

    def _refuse_unprotected_exposure(self) -> None:
        """Past loopback, serve only with TLS and API keys, unless told --insecure."""
        s = self.settings
        if s.loopback_only or (s.tls and self.access.required):
            return
        missing = " and ".join(what for what, ok in (("TLS", s.tls),
                                                     ("API keys", self.access.required))
                               if not ok)
        if s.gateway_insecure:
            log.warning("serving on %s / %s without %s (LMFORGE_GATEWAY_INSECURE)",
                        s.gateway_host, s.gateway_http_host, missing)
            return
        log.error("refusing to serve on %s / %s without %s: set LMFORGE_GATEWAY_TLS_CERT/_KEY "
                  "and create a key (`lmforge keys create --tenant T`), or pass --insecure",
                  s.gateway_host, s.gateway_http_host, missing)
        raise SystemExit(2)

    async def serve(self, stop: asyncio.Event) -> None:
        follower = asyncio.create_task(self._follow_deployments(stop))
        keys = asyncio.create_task(self.access.follow(stop))
        stopped = asyncio.create_task(stop.wait())
        try:
            if self._restore is not None:
                await asyncio.wait({stopped, self._restore},
                                   return_when=asyncio.FIRST_COMPLETED)
                if self._restore.done() and (failed := self._restore.exception()):
                    raise failed  # the ports could not be bound: stop, to be restarted
            await stopped
        finally:
            stopped.cancel()
            restoring = self._restore if self._restore and not self._restore.done() else None
            for task in (follower, keys, restoring):
                if task is None:
                    continue
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self.http is not None:
                await self.http.stop()
            await self.server.stop()
            # Stopped and reaped here, before the interpreter exits: nothing of ours is
            # left to take a stopping engine process for a crashed one. A load still
            # building (the restore's, cancelled above, or a model.exported's) is waited
            # for and what it builds closed: its thread cannot be stopped.
            await self.loader.close()
            await asyncio.to_thread(self.registry.close)
            log.info("engines stopped")
