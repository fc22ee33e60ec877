"""TLS for the gateway's ports from LMFORGE_GATEWAY_TLS_* (mutual TLS with a client CA)."""

from __future__ import annotations

import ssl

import grpc

from services.inference_gateway.settings import GatewaySettings


def grpc_credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    if not settings.tls:
        return None
    assert settings.gateway_tls_cert is not None and settings.gateway_tls_key is not None
    client_ca = settings.gateway_tls_client_ca
    return grpc.ssl_server_credentials(
        [(settings.gateway_tls_key.read_bytes(), settings.gateway_tls_cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None)


def http_ssl_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    if not settings.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.gateway_tls_cert), str(settings.gateway_tls_key))
    if settings.gateway_tls_client_ca is not None:
        context.load_verify_locations(cafile=str(settings.gateway_tls_client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context
