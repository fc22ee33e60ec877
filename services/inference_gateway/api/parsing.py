"""A gRPC request that does not parse is INVALID_ARGUMENT, said and counted like any other.

grpcio deserialises a request before the servicer sees it, and a message it
cannot parse (a `string` field holding bytes that are not UTF-8, a truncated
body) ends the call with UNKNOWN and a log line of its own. This interceptor
gives the gateway's own services (native Generate, KServe v2) a deserialiser
that hands such a request on as an `Unparsed` value instead, and refuses it
with INVALID_ARGUMENT and a message saying what was wrong; an inference call
refused so is counted in `lmforge_gateway_requests_total` under its protocol
(model "", code INVALID_ARGUMENT).

A request over LMFORGE_GATEWAY_MAX_MESSAGE_BYTES is refused here too, with
RESOURCE_EXHAUSTED, the size and the limit, and counted: grpcio's own limit is set
`OVERSIZE_CEILING` times higher, because a request grpcio refuses never reaches an
interceptor and so was answered without being counted (the hostile corpus found it).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from services.inference_gateway.api.kserve import KSERVE_SERVICE
from services.inference_gateway.api.kserve import PROTOCOL as KSERVE
from services.inference_gateway.api.native import GENERATOR_SERVICE
from services.inference_gateway.api.native import PROTOCOL as NATIVE
from services.inference_gateway.errors import GatewayError, InvalidRequest, RequestTooLarge
from services.inference_gateway.frontend import REQUESTS

OVERSIZE_CEILING = 4
"""grpcio's receive limit, in multiples of the gateway's: past it grpcio refuses alone."""

GUARDED_SERVICES = (GENERATOR_SERVICE, KSERVE_SERVICE)
INFERENCE_METHODS = {
    f"/{GENERATOR_SERVICE}/Generate": NATIVE,
    f"/{KSERVE_SERVICE}/ModelInfer": KSERVE,
    f"/{KSERVE_SERVICE}/ModelStreamInfer": KSERVE,
}


@dataclass(frozen=True, slots=True)
class Unparsed:
    """A request message that did not parse, and why."""

    error: GatewayError


def _lenient(deserialize: Callable[[bytes], Any], method: str, max_message_bytes: int
             ) -> Callable[[bytes], Any]:
    message = method.rsplit("/", 1)[-1]

    def parse(data: bytes) -> Any:
        if max_message_bytes and len(data) > max_message_bytes:
            return Unparsed(RequestTooLarge(
                f"the {message} request is {len(data)} bytes; the limit is "
                f"{max_message_bytes} (LMFORGE_GATEWAY_MAX_MESSAGE_BYTES)"))
        try:
            return deserialize(data)
        except Exception as exc:
            return Unparsed(InvalidRequest(
                f"the {message} request ({len(data)} bytes) does not parse: a string field "
                f"that is not valid UTF-8, or a malformed message ({exc})"))

    return parse


class RefuseUnparsedRequests(grpc.aio.ServerInterceptor):
    """INVALID_ARGUMENT for a request of the gateway's services that does not parse,
    RESOURCE_EXHAUSTED for one over `max_message_bytes` (0: no limit of its own)."""

    def __init__(self, *, max_message_bytes: int = 0) -> None:
        self.max_message_bytes = max_message_bytes

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails],
                                     Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        service = method.lstrip("/").split("/", 1)[0]
        if handler is None or handler.request_deserializer is None or \
                service not in GUARDED_SERVICES:
            return handler
        return _guarded(handler, method, self.max_message_bytes)


def _guarded(handler: grpc.RpcMethodHandler[Any, Any], method: str, max_message_bytes: int
             ) -> grpc.RpcMethodHandler[Any, Any]:
    assert handler.request_deserializer is not None
    parse = _lenient(handler.request_deserializer, method, max_message_bytes)
    protocol = INFERENCE_METHODS.get(method)

    async def refuse(context: grpc.aio.ServicerContext, unparsed: Unparsed) -> NoReturn:
        if protocol is not None:
            REQUESTS.labels("", protocol, unparsed.error.code).inc()
        await context.abort(unparsed.error.grpc_code, unparsed.error.message)

    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Unparsed):
                await refuse(context, request)
            yield request

    def wrap(behavior: Callable[..., Any], streaming_in: bool) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):
            async def stream(request: Any, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[Any]:
                if streaming_in:
                    request = checked(request, context)
                elif isinstance(request, Unparsed):
                    await refuse(context, request)
                async for response in behavior(request, context):
                    yield response
            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if streaming_in:
                request = checked(request, context)
            elif isinstance(request, Unparsed):
                await refuse(context, request)
            return await behavior(request, context)
        return call

    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary, False), parse, serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream, False), parse, serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary, True), parse, serializer)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(
        wrap(handler.stream_stream, True), parse, serializer)
