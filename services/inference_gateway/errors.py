"""Why a request was not served, said the same way by every protocol.

Everything below the protocol layer (the frontend, the registry, the engines)
raises a `GatewayError`; each type carries its gRPC status code, its HTTP
status and the OpenAI error type, so each protocol has one `except
GatewayError` that turns it into its own shape (a gRPC status, a KServe
stream's `error_message`, an OpenAI error body or server-sent event).

| type | gRPC | HTTP | when |
| --- | --- | --- | --- |
| Unauthenticated | UNAUTHENTICATED | 401 | API keys are required and none or a bad one came |
| RateLimited | RESOURCE_EXHAUSTED | 429 + Retry-After | the key spent its token bucket |
| InvalidRequest | INVALID_ARGUMENT | 400 | the request cannot be served as asked |
| RequestTooLarge | RESOURCE_EXHAUSTED | 413 | the body is over the size limit |
| RequestTimeout | DEADLINE_EXCEEDED | 408 | the body trickled in slower than its deadline |
| UnknownModel | NOT_FOUND | 404 | no such model or version, here or on the remote |
| AtCapacity | RESOURCE_EXHAUSTED | 429 | too many requests generating or queued |
| ModelLoading | UNAVAILABLE | 503 + Retry-After | deployed, but not loaded on this replica yet |
| EngineUnavailable | UNAVAILABLE | 503 + Retry-After | the engine process died and restarts |
| UpstreamFailed | UNAVAILABLE | 502 | a remote Triton is down or answered an error |
| GenerationFailed | INTERNAL | 500 | the engine failed while generating |
"""

from __future__ import annotations

from typing import ClassVar

import grpc


class GatewayError(Exception):
    """A request the gateway did not serve; `message` says what was wrong and what to do."""

    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    http_status: ClassVar[int] = 500
    openai_type: ClassVar[str] = "server_error"
    openai_code: ClassVar[str] = "internal_error"
    retry_after_s: int | None = None
    """Seconds a client should wait before retrying (HTTP `Retry-After`); None: do not."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def code(self) -> str:
        """The gRPC code's name, as counted in lmforge_gateway_requests_total."""
        return self.grpc_code.name


class Unauthenticated(GatewayError):
    """API keys are configured and the request carried none, or one that is not valid."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    openai_type = "invalid_request_error"
    openai_code = "invalid_api_key"


class RateLimited(GatewayError):
    """The key's token bucket is empty: `retry_after_s` is when it holds a token again."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    openai_type = "rate_limit_error"
    openai_code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InvalidRequest(GatewayError):
    """The request cannot be served as asked: a bad field, prompt, tensor or body."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    openai_type = "invalid_request_error"
    openai_code = "invalid_value"


class RequestTooLarge(GatewayError):
    """The request is over LMFORGE_GATEWAY_MAX_MESSAGE_BYTES."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413
    openai_type = "invalid_request_error"
    openai_code = "request_too_large"


class RequestTimeout(GatewayError):
    """The request body did not arrive in time (a client trickling it byte by byte)."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 408
    openai_type = "invalid_request_error"
    openai_code = "request_timeout"


class UnknownModel(GatewayError):
    """No such model (or version) is served here, or the remote server behind it lacks it."""

    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    openai_type = "invalid_request_error"
    openai_code = "model_not_found"


class AtCapacity(GatewayError):
    """Too many requests generating or queued: refused now rather than queued without bound."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    openai_type = "rate_limit_error"
    openai_code = "at_capacity"


class ModelLoading(GatewayError):
    """The model is deployed (recorded in the deployments bucket) but this replica has not
    loaded it yet: it is restoring, loading a new version, or retrying a failed load."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    openai_type = "server_error"
    openai_code = "model_loading"
    retry_after_s = 2  # a small model loads in a few seconds; another replica may have it


class EngineUnavailable(GatewayError):
    """The engine process exited (and is being restarted): retry the request shortly."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    openai_type = "server_error"
    openai_code = "engine_unavailable"
    retry_after_s = 5  # a small model's engine process restarts in a few seconds


class UpstreamFailed(GatewayError):
    """The remote Triton (KServe v2) server behind a model is down or answered an error."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 502
    openai_type = "server_error"
    openai_code = "upstream_failed"


class GenerationFailed(GatewayError):
    """The engine failed while generating (a bug or a kernel error; it keeps serving)."""
