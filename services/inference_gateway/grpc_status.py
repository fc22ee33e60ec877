"""The frontend's refusals as gRPC status codes: one mapping for the native Generate
servicer and the KServe v2 one, so both answer a bad request the same way."""

from __future__ import annotations

import grpc

from services.inference_gateway.engines.torch import RequestError
from services.inference_gateway.frontend import CapacityError
from services.inference_gateway.registry import UnknownModelError

REFUSALS = (RequestError, UnknownModelError, CapacityError)
"""What `GenerationFrontend.stream` raises before the first piece for a request it refuses."""

_CODES = {RequestError: grpc.StatusCode.INVALID_ARGUMENT,
          UnknownModelError: grpc.StatusCode.NOT_FOUND,
          CapacityError: grpc.StatusCode.RESOURCE_EXHAUSTED}


def refusal_message(exc: Exception) -> str:
    # KeyError's str() quotes its message; its first argument is the sentence itself.
    return exc.args[0] if isinstance(exc, UnknownModelError) else str(exc)


async def abort_refused(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """End the call with the status that names what was wrong (raises, as abort does)."""
    code = next(code for kind, code in _CODES.items() if isinstance(exc, kind))
    await context.abort(code, refusal_message(exc))
