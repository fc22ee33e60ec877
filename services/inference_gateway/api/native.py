"""lmforge.v1.Generator/Generate: the native streaming API.

A request's GatewayError ends the call with its gRPC status and message, also
after pieces were sent (an engine that died mid-stream is UNAVAILABLE).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import grpc

from lmforge.contracts.v1 import generate_pb2, generate_pb2_grpc
from services.inference_gateway.errors import GatewayError
from services.inference_gateway.frontend import GenerationFrontend, GenerationRequest, counted

GENERATOR_SERVICE = generate_pb2.DESCRIPTOR.services_by_name["Generator"].full_name
PROTOCOL = "native"


class GeneratorServicer(generate_pb2_grpc.GeneratorServicer):
    def __init__(self, frontend: GenerationFrontend) -> None:
        self.frontend = frontend

    async def Generate(self, request: generate_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        cancelled = threading.Event()
        wanted = GenerationRequest(model=request.model, prompt=request.prompt,
                                   max_new_tokens=request.max_new_tokens,
                                   temperature=request.temperature, top_p=request.top_p,
                                   seed=request.seed, top_k=request.top_k,
                                   stop=tuple(request.stop))
        try:
            with counted(PROTOCOL, request.model):
                async for piece in self.frontend.stream(wanted, cancelled):
                    yield generate_pb2.GenerateResponse(
                        text=piece.text, finish_reason=piece.finish_reason,
                        completion_tokens=piece.completion_tokens,
                        prompt_tokens=piece.prompt_tokens)
        except GatewayError as exc:
            await context.abort(exc.grpc_code, exc.message)
