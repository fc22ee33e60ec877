"""inference-gateway's bus wiring and serving loop.

model.exported -> load the exported hf/ directory -> swap it in -> model.deployed.
What is deployed is also written to the `lmforge_deployments` key-value bucket,
so a restarted gateway (or a new replica) serves the same models at once.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket, ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import Delivery, subscriber
from lmforge.service import Service
from services.inference_gateway.api.openai import OpenAIServer
from services.inference_gateway.api.server import GatewayServer
from services.inference_gateway.engines import RemoteTritonEngine, build_engine
from services.inference_gateway.frontend import GenerationFrontend, Limits
from services.inference_gateway.registry import ModelRegistry
from services.inference_gateway.settings import GatewaySettings

log = logging.getLogger("lmforge.gateway")


class GatewayService(Service[GatewaySettings]):
    name = ServiceName.INFERENCE_GATEWAY
    Settings = GatewaySettings

    def __init__(self, settings, bus) -> None:
        super().__init__(settings, bus)
        s: GatewaySettings = settings
        torch.set_num_threads(s.engine_threads)
        self.registry = ModelRegistry()
        self.frontend = GenerationFrontend(self.registry, Limits(
                max_new_tokens=s.gateway_max_new_tokens,
                max_concurrency=s.max_generating,
                max_queue=s.gateway_max_queue,
                max_prompt_chars=s.gateway_max_prompt_chars))
        self.server = GatewayServer(self.frontend, host=s.gateway_host, port=s.gateway_port,
                                    max_message_bytes=s.gateway_max_message_bytes)
        self.http = (OpenAIServer(self.frontend, host=s.gateway_http_host,
                                  port=s.gateway_http_port,
                                  max_body_bytes=s.gateway_max_message_bytes)
                     if s.gateway_http else None)
        self.endpoint = s.gateway_advertise or f"{s.gateway_host}:{self.server.port}"

    async def _load(self, event: ev.ModelExported) -> None:
        (export_dir,) = self.input_dirs(event.run_id, event.export)
        engine = await asyncio.to_thread(build_engine, self.settings, export_dir, event.version)
        self.registry.install(event.model_name, engine)
        await self.server.set_serving(True)
        log.info("serving %s version %s", event.model_name, event.version)

    @subscriber(subjects.MODEL_EXPORTED, per_replica=True)
    async def on_exported(self, event: ev.ModelExported, delivery: Delivery
                          ) -> ev.ModelDeployed:
        await self._load(event)
        await self.bus.key_value(Bucket.DEPLOYMENTS).put(event.model_name,
                                                         event.SerializeToString())
        return ev.ModelDeployed(run_id=event.run_id, model_name=event.model_name,
                                version=event.version, endpoint=self.endpoint,
                                backend=self.settings.gateway_backend)

    async def _restore_deployments(self) -> None:
        kv = self.bus.key_value(Bucket.DEPLOYMENTS)
        names = await kv.keys()
        for name in names:
            entry = await kv.get(name)
            if entry is None:
                continue
            event = ev.ModelExported()
            event.ParseFromString(entry)
            try:
                await self._load(event)
            except Exception as exc:  # a broken deployment must not stop the others
                log.error("could not restore %s: %s", name, exc)

    def _install_remote_models(self) -> None:
        for remote in self.settings.gateway_remote_models:
            self.registry.install(remote.name, RemoteTritonEngine(remote))
            log.info("serving %s from %s (remote model %s)", remote.name, remote.url,
                     remote.remote_model)

    async def start(self) -> None:
        self._install_remote_models()
        await self.server.start()
        if self.registry.names():
            await self.server.set_serving(True)
        log.info("gRPC gateway on %s", self.endpoint)
        if self.http is not None:
            port = await self.http.start()
            log.info("OpenAI-compatible HTTP on %s:%d/v1", self.settings.gateway_http_host, port)
        await super().start()

    async def serve(self, stop: asyncio.Event) -> None:
        try:
            await self._restore_deployments()
            await stop.wait()
        finally:
            if self.http is not None:
                await self.http.stop()
            await self.server.stop()
