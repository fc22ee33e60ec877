"""The KServe v2 / Triton gRPC inference protocol, on tritonclient's own servicer.

`inference.GRPCInferenceService` as generated inside the `tritonclient` package
(no copied .proto files), so `tritonclient.grpc.InferenceServerClient` works
unchanged. LLM models follow the convention of Triton's LLM backends:

  inputs   text_input BYTES [1] (required), max_tokens INT32 [1], temperature FP32 [1],
           top_p FP32 [1], top_k INT32 [1], seed UINT64 [1]
  output   text_output BYTES [1]

ModelInfer returns the whole completion; ModelStreamInfer is decoupled: one
response per new piece of text, the last one carrying the parameter
`triton_final_response: true` (as Triton does). A request's GatewayError ends
ModelInfer with its gRPC status; in a stream it is sent as that request's
`error_message` (Triton's way: the stream has no per-request status), and the
stream goes on serving.
"""

from __future__ import annotations

import dataclasses
import struct
import threading
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from lmforge import __version__
from services.inference_gateway.engines.base import Piece
from services.inference_gateway.errors import GatewayError, InvalidRequest
from services.inference_gateway.frontend import GenerationFrontend, GenerationRequest, counted

KSERVE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PROTOCOL = "kserve"
INPUTS = {  # name: (datatype, numpy dtype, config type, required)
    "text_input": ("BYTES", None, mc.TYPE_STRING, True),
    "max_tokens": ("INT32", "<i4", mc.TYPE_INT32, False),
    "temperature": ("FP32", "<f4", mc.TYPE_FP32, False),
    "top_p": ("FP32", "<f4", mc.TYPE_FP32, False),
    "seed": ("UINT64", "<u8", mc.TYPE_UINT64, False),
    "top_k": ("INT32", "<i4", mc.TYPE_INT32, False),
}
CONTENTS_FIELD = {"BYTES": "bytes_contents", "INT32": "int_contents",
                  "FP32": "fp32_contents", "UINT64": "uint64_contents"}
OUTPUT = "text_output"


def encode_bytes(values: list[bytes]) -> bytes:
    """Triton's BYTES wire format: each element as a 4-byte little-endian length + data."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def decode_bytes(raw: bytes) -> list[bytes]:
    values, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidRequest("BYTES tensor is truncated (a length prefix is cut off)")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidRequest(f"BYTES element of {length} bytes runs past the tensor's end")
        values.append(raw[offset : offset + length])
        offset += length
    return values


def parse_request(request: pb.ModelInferRequest) -> GenerationRequest:
    """Check names, datatypes and shapes; raises InvalidRequest saying what was wrong."""
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidRequest(f"{len(request.raw_input_contents)} raw input contents for "
                             f"{len(request.inputs)} inputs")
    for out in request.outputs:
        if out.name != OUTPUT:
            raise InvalidRequest(f"unknown output {out.name!r}; this model has {OUTPUT!r}")
    values: dict[str, bytes | int | float] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name not in INPUTS:
            raise InvalidRequest(f"unknown input {tensor.name!r}; expected {sorted(INPUTS)}")
        datatype, np_dtype, _, _ = INPUTS[tensor.name]
        if tensor.datatype != datatype:
            raise InvalidRequest(f"input {tensor.name!r} has datatype {tensor.datatype}; "
                                 f"expected {datatype}")
        count = int(np.prod(tensor.shape)) if len(tensor.shape) else 0
        if count != 1 or any(d < 0 for d in tensor.shape):
            raise InvalidRequest(f"input {tensor.name!r} has shape {list(tensor.shape)}; this "
                                 "model takes exactly one element ([1] or [1, 1])")
        items: list[bytes] | list[int | float]
        if request.raw_input_contents:
            raw = request.raw_input_contents[i]
            if datatype == "BYTES":
                items = decode_bytes(raw)
            else:
                width = np.dtype(np_dtype).itemsize
                if len(raw) != width:
                    raise InvalidRequest(f"input {tensor.name!r} carries {len(raw)} bytes; one "
                                         f"{datatype} is {width}")
                items = np.frombuffer(raw, dtype=np_dtype).tolist()
        else:
            items = list(getattr(tensor.contents, CONTENTS_FIELD[datatype]))
        if len(items) != 1:
            raise InvalidRequest(f"input {tensor.name!r} holds {len(items)} elements for "
                                 "shape [1]")
        values[tensor.name] = items[0]
    text_input = values.get("text_input")
    if not isinstance(text_input, bytes):
        raise InvalidRequest("input 'text_input' (BYTES) is required")
    try:
        prompt = text_input.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"text_input is not valid UTF-8 (byte {exc.start})") from None
    max_tokens = int(values.get("max_tokens", 0))
    if "max_tokens" in values and max_tokens <= 0:
        raise InvalidRequest(f"max_tokens {max_tokens} must be positive")
    return GenerationRequest(
        model=request.model_name, prompt=prompt, max_new_tokens=max_tokens,
        temperature=float(values.get("temperature", 0.0)),
        top_p=float(values.get("top_p", 0.0)), seed=int(values.get("seed", 0)),
        top_k=int(values.get("top_k", 0)))


def text_response(request: pb.ModelInferRequest, version: str, text: str, *,
                  final: bool | None = None, piece: Piece | None = None
                  ) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version=version, id=request.id,
        outputs=[pb.ModelInferResponse.InferOutputTensor(name=OUTPUT, datatype="BYTES",
                                                         shape=[1])],
        raw_output_contents=[encode_bytes([text.encode("utf-8")])])
    if final is not None:
        response.parameters["triton_final_response"].bool_param = final
    if piece is not None:  # lmforge extras; Triton clients ignore unknown parameters
        response.parameters["completion_tokens"].int64_param = piece.completion_tokens
        response.parameters["prompt_tokens"].int64_param = piece.prompt_tokens
        if piece.finish_reason:
            response.parameters["finish_reason"].string_param = piece.finish_reason
    return response


async def _abort(context: grpc.aio.ServicerContext, error: GatewayError) -> NoReturn:
    """End the call with the error's gRPC status and message (raises, as abort does)."""
    await context.abort(error.grpc_code, error.message)


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, frontend: GenerationFrontend) -> None:
        self.frontend = frontend
        self.registry = frontend.registry

    # -- health and metadata ------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self.registry.names()))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelReadyResponse:
        versions = self.registry.versions(request.name)
        return pb.ModelReadyResponse(ready=bool(versions) and request.version in ("", *versions))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="lmforge", version=__version__, extensions=[])

    async def _loaded_versions(self, name: str, version: str,
                               context: grpc.aio.ServicerContext) -> list[str]:
        """The loaded versions of `name`, newest first; ends the call with UNAVAILABLE when
        it is deployed but still loading here, NOT_FOUND when `name` (or the `version`
        asked for) is not served."""
        versions = self.registry.versions(name)
        if not versions or version not in ("", *versions):
            await _abort(context, self.registry.missing(name, version))
        return versions

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        versions = await self._loaded_versions(request.name, request.version, context)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name, versions=versions, platform="lmforge_llm",
            inputs=[tensor(name=n, datatype=spec[0], shape=[1]) for n, spec in INPUTS.items()],
            outputs=[tensor(name=OUTPUT, datatype="BYTES", shape=[1])])

    async def ModelConfig(self, request: pb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        await self._loaded_versions(request.name, request.version, context)
        config = mc.ModelConfig(
            name=request.name, platform="lmforge_llm", backend="lmforge", max_batch_size=0,
            input=[mc.ModelInput(name=n, data_type=spec[2], dims=[1], optional=not spec[3])
                   for n, spec in INPUTS.items()],
            output=[mc.ModelOutput(name=OUTPUT, data_type=mc.TYPE_STRING, dims=[1])],
            model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True))
        return pb.ModelConfigResponse(config=config)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse.ModelIndex
        ready = [index(name=n, version=v, state="READY")
                 for n in self.registry.names() for v in self.registry.versions(n)]
        pending = [index(name=n, version=p.version,
                         state="UNAVAILABLE" if p.attempts else "LOADING", reason=p.describe())
                   for n, p in sorted(self.registry.pending().items())]
        return pb.RepositoryIndexResponse(models=ready + pending)

    # -- inference ---------------------------------------------------------------

    async def _generate(self, request: pb.ModelInferRequest, cancelled: threading.Event
                        ) -> AsyncIterator[Piece | GatewayError]:
        """One request's pieces, or the error that ends it (last); counted either way."""
        try:
            with counted(PROTOCOL, request.model_name):
                wanted = dataclasses.replace(parse_request(request),
                                             version=request.model_version)
                async for piece in self.frontend.stream(wanted, cancelled):
                    yield piece
        except GatewayError as exc:
            yield exc

    def _version(self, request: pb.ModelInferRequest) -> str:
        return request.model_version or self.registry.version(request.model_name) or ""

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        cancelled = threading.Event()
        text = []
        async for item in self._generate(request, cancelled):
            if isinstance(item, GatewayError):
                await _abort(context, item)
            text.append(item.text)
        return text_response(request, self._version(request), "".join(text))

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        cancelled = threading.Event()
        async for request in request_iterator:
            version = self._version(request)
            async for item in self._generate(request, cancelled):
                if isinstance(item, GatewayError):
                    yield pb.ModelStreamInferResponse(error_message=item.message)
                else:
                    yield pb.ModelStreamInferResponse(infer_response=text_response(
                        request, version, item.text, final=bool(item.finish_reason),
                        piece=item))
