"""inference-gateway's bus wiring and serving loop.

model.exported -> load the exported hf/ directory -> swap it in -> model.deployed.
What is deployed is also written to the `lmforge_deployments` key-value bucket,
so a restarted gateway (or a new replica) serves the same models at once.
"""

from __future__ import annotations

import asyncio
import logging

import torch
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket, ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import Delivery, subscriber
from lmforge.service import Service
from lmforge.settings import ServiceSettings
from services.inference_gateway.api.openai import OpenAIServer
from services.inference_gateway.api.server import GatewayServer
from services.inference_gateway.engines.onnx import OnnxEngine
from services.inference_gateway.engines.process import EngineProcess
from services.inference_gateway.engines.remote_triton import RemoteTritonEngine
from services.inference_gateway.engines.torch import GenerationEngine, default_threads
from services.inference_gateway.frontend import GenerationFrontend, Limits
from services.inference_gateway.registry import ModelRegistry

log = logging.getLogger("lmforge.gateway")


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", frozen=True)

    gateway_host: str = Field("127.0.0.1", description="Address the gRPC server binds.")
    gateway_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = any).")
    gateway_advertise: str = Field("", description="host:port put in model.deployed.")
    gateway_max_new_tokens: int = Field(512, ge=1, description="Cap on max_new_tokens.")
    gateway_max_concurrency: int = Field(4, ge=1, description="Requests generating at once.")
    gateway_max_queue: int = Field(64, ge=0, description="Requests allowed to wait.")
    gateway_max_prompt_chars: int = Field(100_000, ge=1, description="Longest prompt.")
    gateway_max_message_bytes: int = Field(4 << 20, ge=1024, description="Largest request.")
    gateway_http_host: str = Field("127.0.0.1", description="OpenAI-compatible HTTP bind.")
    gateway_http_port: int = Field(8000, ge=0, le=65535, description="HTTP port (0 = any).")
    gateway_http: bool = Field(True, description="Serve the OpenAI-compatible HTTP API.")
    gateway_remote_models: str = Field(
        "", description="Models served by a remote Triton/KServe v2 server: "
        "'name=host:port/remote_model,...'.")
    gateway_backend: str = Field("torch", pattern="^(torch|onnx)$",
                                 description="Local backend for exported models.")
    gateway_dtype: str = Field("fp32", pattern="^(fp32|bf16)$",
                               description="Weights of the PyTorch backend (bf16 halves memory; "
                               "fast only where the hardware has bf16).")
    gateway_device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$",
                                description="Where the PyTorch backend runs: cpu, cuda, cuda:N.")
    gateway_batching: bool = Field(True, description="Continuous batching (else one request "
                                   "per slot, MAX_CONCURRENCY slots).")
    gateway_max_batch: int = Field(32, ge=1, description="Sequences per decoding step.")
    gateway_threads: int = Field(0, ge=0, description="Torch threads for the engines; 0 = one "
                                 "fewer than the usable cores (one is left to gRPC and HTTP).")


class GatewayService(Service[GatewaySettings]):
    name = ServiceName.INFERENCE_GATEWAY
    Settings = GatewaySettings

    def __init__(self, settings, bus) -> None:
        super().__init__(settings, bus)
        s: GatewaySettings = settings
        torch.set_num_threads(s.gateway_threads or default_threads())
        self.registry = ModelRegistry()
        self.frontend = GenerationFrontend(self.registry, Limits(
                max_new_tokens=s.gateway_max_new_tokens,
                max_concurrency=s.gateway_max_batch if s.gateway_batching
                else s.gateway_max_concurrency,
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
        if self.settings.gateway_backend == "onnx":
            engine = await asyncio.to_thread(OnnxEngine, export_dir, version=event.version,
                                             threads=torch.get_num_threads())
        else:
            kind = EngineProcess if self.settings.gateway_batching else GenerationEngine
            options = ({"max_batch": self.settings.gateway_max_batch,
                        "threads": torch.get_num_threads()}
                       if self.settings.gateway_batching else {})
            engine = await asyncio.to_thread(kind, export_dir / "hf", version=event.version,
                                             dtype=self.settings.gateway_dtype,
                                             device=self.settings.gateway_device, **options)
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
        for item in filter(None, (i.strip() for i in
                                  self.settings.gateway_remote_models.split(","))):
            name, sep, target = item.partition("=")
            address, slash, remote = target.partition("/")
            if not (sep and slash and name and address and remote):
                raise SystemExit(f"invalid settings: LMFORGE_GATEWAY_REMOTE_MODELS item "
                                 f"{item!r} is not name=host:port/remote_model")
            self.registry.install(name, RemoteTritonEngine(address, remote))
            log.info("serving %s from %s (remote model %s)", name, address, remote)

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
