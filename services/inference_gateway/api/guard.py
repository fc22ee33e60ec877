"""The API-key check in front of every model-serving call, for gRPC and HTTP.

Both admit a request through `access.AccessControl` (key, tenant, rate limit)
before any work, set `access.caller_tenant` for the registry to hide other
tenants' models, and answer a refusal with the error's own status: gRPC
UNAUTHENTICATED / RESOURCE_EXHAUSTED (with `retry-after` trailing metadata),
HTTP 401 / 429 (with `Retry-After`). Health and reflection pass unchecked.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web

from services.inference_gateway.access import (
    AccessControl,
    caller_tenant,
    is_open_method,
    key_from_headers,
)
from services.inference_gateway.api.openai import error_response
from services.inference_gateway.errors import GatewayError

OPEN_HTTP_PATHS = frozenset({"/health", "/healthz"})


class RequireApiKey(grpc.aio.ServerInterceptor):
    def __init__(self, access: AccessControl) -> None:
        self.access = access

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails],
                                     Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or is_open_method(handler_call_details.method):
            return handler
        return _admitted(handler, self.access)


async def _admit(access: AccessControl, context: grpc.aio.ServicerContext) -> str | None:
    try:
        return access.admit(key_from_headers(context.invocation_metadata() or ()))
    except GatewayError as error:
        if error.retry_after_s is not None:
            context.set_trailing_metadata((("retry-after", str(error.retry_after_s)),))
        await context.abort(error.grpc_code, error.message)
        raise  # abort raises; this is for the type checker


def _admitted(handler: grpc.RpcMethodHandler[Any, Any], access: AccessControl
              ) -> grpc.RpcMethodHandler[Any, Any]:
    def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):
            async def stream(request: Any, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[Any]:
                token = caller_tenant.set(await _admit(access, context))
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    caller_tenant.reset(token)
            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = caller_tenant.set(await _admit(access, context))
            try:
                return await behavior(request, context)
            finally:
                caller_tenant.reset(token)
        return call

    parse, serialize = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), parse, serialize)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), parse,
                                                    serialize)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), parse,
                                                    serialize)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), parse, serialize)


def http_guard(access: AccessControl) -> Any:
    """aiohttp middleware: admit the request, or answer 401/429 as an OpenAI error."""

    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request],
                                                            Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if request.path in OPEN_HTTP_PATHS:
            return await handler(request)
        try:
            tenant = access.admit(key_from_headers(request.headers.items()))
        except GatewayError as error:
            return error_response(error)
        token = caller_tenant.set(tenant)
        try:
            return await handler(request)
        finally:
            caller_tenant.reset(token)

    return guard
