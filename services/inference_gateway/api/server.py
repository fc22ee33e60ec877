"""The gRPC server: lmforge.v1.Generator, the KServe v2 inference protocol,
grpc.health.v1 and server reflection, on one grpc.aio server.

`grpc.server.max_pending_requests` is raised far above our own admission bound
(GenerationFrontend), so grpc.aio never cancels bursts on its own; overload is
answered deliberately with RESOURCE_EXHAUSTED.

The port is bound in `start()`, not before: replicas share it (SO_REUSEPORT),
and the kernel hands a listening socket its share of new connections even
before the server accepts them, so a replica that finds another one listening
(`another_replica_listens`) binds only once it has restored its models.
A request that does not parse as its message (a string field that is not
UTF-8, truncated bytes) is INVALID_ARGUMENT, not grpcio's UNKNOWN (api/parsing.py).

Run it as part of the service: `python -m services.inference_gateway` (handlers.py
builds settings -> engines -> registry -> frontend -> this server and the HTTP one;
SIGTERM stops both gracefully). Tests start it alone with `tests.helpers.start_gateway`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2_grpc as kserve_grpc

from lmforge.contracts.v1 import generate_pb2_grpc
from services.inference_gateway.api.kserve import KSERVE_SERVICE, KServeServicer
from services.inference_gateway.api.native import GENERATOR_SERVICE, GeneratorServicer
from services.inference_gateway.api.parsing import OVERSIZE_CEILING, RefuseUnparsedRequests
from services.inference_gateway.frontend import GenerationFrontend


async def another_replica_listens(host: str, port: int, *, timeout_s: float = 1.0) -> bool:
    """Whether something already accepts connections on the shared port (another replica:
    the port is SO_REUSEPORT). Port 0 asks for a port of its own: nobody shares it."""
    if port == 0:
        return False
    address = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(
        host, host)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


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
