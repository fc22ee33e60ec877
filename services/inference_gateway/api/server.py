"""The gRPC server: lmforge.v1.Generator, the KServe v2 inference protocol,
grpc.health.v1 and server reflection, on one grpc.aio server.

`grpc.server.max_pending_requests` is raised far above our own admission bound
(GenerationFrontend), so grpc.aio never cancels bursts on its own; overload is
answered deliberately with RESOURCE_EXHAUSTED.

The port is bound in `start()`, not before: replicas share it (SO_REUSEPORT),
and the kernel hands a listening socket its share of new connections even
before the server accepts them, so a replica that finds another one listening
(`who_listens`) binds only once it has restored its models; one that finds
something else there fails at once.
A request that does not parse as its message (a string field that is not
UTF-8, truncated bytes) is INVALID_ARGUMENT, not grpcio's UNKNOWN (api/parsing.py).

Run it as part of the service: `python -m services.inference_gateway` (handlers.py
builds settings -> engines -> registry -> frontend -> this server and the HTTP one;
SIGTERM stops both gracefully). Tests start it alone with `tests.helpers.start_gateway`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2_grpc as kserve_grpc

from lmforge.contracts.v1 import generate_pb2_grpc
from services.inference_gateway.api.kserve import KSERVE_SERVICE, KServeServicer
from services.inference_gateway.api.native import GENERATOR_SERVICE, GeneratorServicer
from services.inference_gateway.api.parsing import OVERSIZE_CEILING, RefuseUnparsedRequests
from services.inference_gateway.frontend import GenerationFrontend


class PortHolder(enum.Enum):
    """What listens on the gateway's port before this replica binds it."""

    NOBODY = "nobody"
    REPLICA = "replica"
    """Another replica of this gateway (shares the port through SO_REUSEPORT)."""
    OTHER = "other"
    """Something that is not a replica: binding would fail, or share it with a stranger."""


@dataclass(frozen=True)
class PortProbe:
    holder: PortHolder
    detail: str = ""
    """What was seen (said when the port is taken by something else)."""


async def who_listens(host: str, port: int, *, tls_cert: Path | None = None,
                      tls_key: Path | None = None, timeout_s: float = 5.0) -> PortProbe:
    """Who accepts connections on the shared port. A replica answers gRPC health for the
    Generator service (plaintext), or presents this gateway's own certificate (TLS: only
    a replica holds its key) within `timeout_s`; anything else is OTHER, so that start-up
    fails at once and not after a restore of minutes. Port 0 asks for a port of its own:
    nobody shares it."""
    if port == 0:
        return PortProbe(PortHolder.NOBODY)
    address = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(
        host, host)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout_s)
    except (OSError, TimeoutError):
        return PortProbe(PortHolder.NOBODY)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    if tls_cert is not None:
        return await _presents_our_certificate(address, port, tls_cert, tls_key, timeout_s)
    return await _answers_gateway_health(address, port, timeout_s)


async def _answers_gateway_health(address: str, port: int, timeout_s: float) -> PortProbe:
    target = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    async with grpc.aio.insecure_channel(target) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString)
        try:
            answer = await check(health_pb2.HealthCheckRequest(service=GENERATOR_SERVICE),
                                 timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            return PortProbe(PortHolder.OTHER, f"gRPC health for {GENERATOR_SERVICE} answered "
                                               f"{exc.code().name}: {exc.details()}")
    return PortProbe(PortHolder.REPLICA, health_pb2.HealthCheckResponse.ServingStatus.Name(
        answer.status))


async def _presents_our_certificate(address: str, port: int, cert: Path, key: Path | None,
                                    timeout_s: float) -> PortProbe:
    ours = ssl.PEM_cert_to_DER_cert(_first_pem_certificate(cert.read_text()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # not trusting it: comparing it with ours
    context.set_alpn_protocols(["h2"])
    if key is not None:  # a replica that asks for client certificates may verify ours
        context.load_cert_chain(str(cert), str(key))
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(address, port, ssl=context), timeout_s)
    except (OSError, TimeoutError) as exc:
        return PortProbe(PortHolder.OTHER, f"no TLS handshake: {type(exc).__name__}: {exc}")
    try:
        tls = writer.get_extra_info("ssl_object")
        theirs = tls.getpeercert(binary_form=True) if tls is not None else None
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    if theirs == ours:
        return PortProbe(PortHolder.REPLICA, "presents this gateway's certificate")
    return PortProbe(PortHolder.OTHER, "its TLS certificate is not this gateway's")


def _first_pem_certificate(text: str) -> str:
    end = "-----END CERTIFICATE-----"
    begin = text.index("-----BEGIN CERTIFICATE-----")
    return text[begin:text.index(end, begin) + len(end)]


class GatewayServer:
    """grpc.aio server with the Generator, health and reflection services."""

    def __init__(self, frontend: GenerationFrontend, *, host: str, port: int,
                 max_message_bytes: int,
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 credentials: grpc.ServerCredentials | None = None) -> None:
        """`interceptors`: run before the request is parsed (the API-key guard);
        `credentials`: TLS (and mutual TLS) for the port, None: plaintext."""
        self.frontend = frontend
        self.credentials = credentials
        # gRPC itself refuses only past OVERSIZE_CEILING x the limit: up to there the
        # interceptor refuses an oversize request itself, said and counted like any other.
        self.server = grpc.aio.server(
            interceptors=[*interceptors,
                          RefuseUnparsedRequests(max_message_bytes=max_message_bytes)],
            options=[
                ("grpc.so_reuseport", 1),  # replicas of the gateway share the port
                ("grpc.max_receive_message_length", max_message_bytes * OVERSIZE_CEILING),
                ("grpc.server.max_pending_requests", 100_000),
            ])
        generate_pb2_grpc.add_GeneratorServicer_to_server(GeneratorServicer(frontend),
                                                          self.server)
        kserve_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(frontend),
                                                               self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (GENERATOR_SERVICE, KSERVE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self.server
        )
        self.host, self.port = host, port
        """The port asked for; once started, the port bound (port 0 asks for any)."""

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", GENERATOR_SERVICE, KSERVE_SERVICE):
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def start(self, *, serving: bool = False) -> None:
        """Bind the port and serve; health says SERVING when `serving`."""
        await self.set_serving(serving)
        address = f"{self.host}:{self.port}"
        bound = (self.server.add_secure_port(address, self.credentials)
                 if self.credentials is not None else self.server.add_insecure_port(address))
        if bound == 0:
            raise OSError(f"cannot bind the gateway to {self.host}:{self.port}")
        self.port = bound
        await self.server.start()

    async def stop(self, grace_s: float = 5.0) -> None:
        with contextlib.suppress(Exception):
            await self.set_serving(False)
        await self.server.stop(grace_s)
