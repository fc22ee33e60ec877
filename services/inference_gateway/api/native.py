"""lmforge.v1.Generator/Generate: the native streaming API."""

from __future__ import annotations

import threading

import grpc

from lmforge.contracts.v1 import generate_pb2, generate_pb2_grpc
from services.inference_gateway.frontend import GenerationFrontend, GenerationRequest
from services.inference_gateway.grpc_status import REFUSALS, abort_refused

GENERATOR_SERVICE = generate_pb2.DESCRIPTOR.services_by_name["Generator"].full_name


class GeneratorServicer(generate_pb2_grpc.GeneratorServicer):
    def __init__(self, frontend: GenerationFrontend) -> None:
        self.frontend = frontend

    async def Generate(self, request, context: grpc.aio.ServicerContext):
        cancelled = threading.Event()
        context.add_done_callback(lambda _ctx: cancelled.set())
        wanted = GenerationRequest(model=request.model, prompt=request.prompt,
                                   max_new_tokens=request.max_new_tokens,
                                   temperature=request.temperature, top_p=request.top_p,
                                   seed=request.seed, top_k=request.top_k,
                                   stop=tuple(request.stop))
        try:
            async for piece in self.frontend.stream(wanted, cancelled):
                yield generate_pb2.GenerateResponse(
                    text=piece.text, finish_reason=piece.finish_reason,
                    completion_tokens=piece.completion_tokens, prompt_tokens=piece.prompt_tokens)
        except REFUSALS as exc:
            await abort_refused(context, exc)
