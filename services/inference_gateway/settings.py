"""inference-gateway settings (env prefix LMFORGE_GATEWAY_; shared ones LMFORGE_)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from lmforge.settings import ServiceSettings
from services.inference_gateway.engines.base import default_threads
from services.inference_gateway.engines.remote_triton import RemoteTritonConfig


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
    gateway_remote_models: Annotated[list[RemoteTritonConfig], NoDecode] = Field(
        default_factory=list, description="Models served by a remote Triton/KServe v2 server: "
        "'name=host:port/remote_model[@convention],...', convention lmforge (default), vllm "
        "or trtllm.")
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

    gateway_tls_cert: Path | None = Field(None, description="Server certificate (PEM) for "
                                          "gRPC and HTTP; with _KEY: TLS on both ports.")
    gateway_tls_key: Path | None = Field(None, description="Its private key (PEM).")
    gateway_tls_client_ca: Path | None = Field(
        None, description="CA (PEM) client certificates must chain to: mutual TLS, "
        "a client without a certificate is refused at the handshake.")
    gateway_insecure: bool = Field(
        False, description="Allow serving on a non-loopback address without TLS or API keys "
        "(`lmforge up --insecure`); otherwise such a gateway refuses to start.")
    gateway_rate_per_s: float = Field(20.0, gt=0, description="Requests/s per API key "
                                      "(token bucket refill), unless the key sets its own.")
    gateway_burst: int = Field(40, ge=1, description="Requests an API key may make at once.")
    gateway_keys_refresh_s: float = Field(1.0, gt=0, description="How often the API keys are "
                                          "re-read: a new or revoked key counts within this.")

    @field_validator("gateway_tls_cert", "gateway_tls_key", "gateway_tls_client_ca")
    @classmethod
    def _readable(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"{path} is not a readable file")
        return path

    @property
    def tls(self) -> bool:
        return self.gateway_tls_cert is not None and self.gateway_tls_key is not None

    @property
    def loopback_only(self) -> bool:
        """Both ports bind loopback addresses (what `lmforge up` does by default)."""
        hosts = [self.gateway_host] + ([self.gateway_http_host] if self.gateway_http else [])
        return all(_is_loopback(h) for h in hosts)

    @field_validator("gateway_remote_models", mode="before")
    @classmethod
    def _parse_remote_models(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        models = [RemoteTritonConfig.parse(item) for item in value.split(",") if item.strip()]
        names = [m.name for m in models]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"model names {twice} appear more than once")
        return models

    @property
    def engine_threads(self) -> int:
        """Torch threads of a serving process (LMFORGE_GATEWAY_THREADS, or the default)."""
        return self.gateway_threads or default_threads()

    @property
    def max_generating(self) -> int:
        """Requests generating at once: the batch, or the single-request slots."""
        return self.gateway_max_batch if self.gateway_batching else self.gateway_max_concurrency


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
