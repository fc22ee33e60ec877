"""A backend that forwards to a remote Triton (or any KServe v2 gRPC) server.

For deployments where the model runs in Triton Inference Server and lmforge's
gateway stays the front door: limits, back-pressure, metrics and the three APIs
are the gateway's; the tokens come from the remote model's decoupled
`ModelStreamInfer` as `text_output` pieces. The request's tensors follow the
remote model's convention (llm_conventions.py): another lmforge gateway's,
Triton's vLLM backend's or the TensorRT-LLM ensemble's. Tested against a second
lmforge gateway, and against in-test servicers that check each convention's
tensors.

The last piece is the response flagged `triton_final_response`, or, where the
server sends the final flag without a response (TensorRT-LLM may), the end of
the stream. vLLM and TensorRT-LLM report neither a finish reason nor token
counts: the last piece says "stop" and the count is of responses, one per
decoding step in streaming mode.

Failures say whose they are. A server that cannot be reached (down, refused,
timed out) or that answers with an error is `UpstreamFailed` (UNAVAILABLE /
502). A remote error in the stream carries only a message, so before calling
it a failure the engine asks the server whether the model is there: a missing
remote model is `UnknownModel` (NOT_FOUND / 404), like a missing local one.
That check runs only on the error path; a served request costs no extra call.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from services.inference_gateway.engines.base import EncodedPrompt, Piece, SamplingParams
from services.inference_gateway.engines.int4_report import Int4Report
from services.inference_gateway.engines.llm_conventions import (
    OUTPUT,
    LlmConvention,
    convention_named,
)
from services.inference_gateway.errors import (
    GatewayError,
    InvalidRequest,
    UnknownModel,
    UpstreamFailed,
)


@dataclass(frozen=True, kw_only=True, slots=True)
class RemoteTritonConfig:
    """One model that a remote Triton / KServe v2 gRPC server serves through this gateway."""

    name: str
    """The model's name here: what clients ask for."""
    url: str
    """host:port of the remote server's gRPC endpoint."""
    remote_model: str
    """The model's name on the remote server."""
    version: str = "remote"
    """The version this gateway reports for it."""
    convention: str = "lmforge"
    """The request tensors the remote model takes: lmforge, vllm or trtllm."""

    def __post_init__(self) -> None:
        convention_named(self.convention)  # an unknown one stops the gateway at start

    @classmethod
    def parse(cls, item: str) -> RemoteTritonConfig:
        """One `name=host:port/remote_model[@convention]` item; raises ValueError saying
        what is wrong."""
        name, sep, target = item.strip().partition("=")
        target, at, convention = target.partition("@")
        url, slash, remote_model = target.partition("/")
        if not (sep and slash and name and url and remote_model) or (at and not convention):
            raise ValueError(f"item {item!r} is not name=host:port/remote_model[@convention]")
        return cls(name=name, url=url, remote_model=remote_model,
                   convention=convention or "lmforge")


class RemoteTritonEngine:
    """The model `config.remote_model` of the server at `config.url`."""

    def __init__(self, config: RemoteTritonConfig) -> None:
        self.config = config
        self.version = config.version
        self.int4_report: Int4Report | None = None
        self.convention: LlmConvention = convention_named(config.convention)

    def encode_prompt(self, prompt: str) -> EncodedPrompt:
        """The remote side tokenizes; the prompt travels as text."""
        if not prompt:
            raise InvalidRequest("prompt is empty")
        return EncodedPrompt(prompt)

    def _where(self) -> str:
        return f"remote model {self.config.remote_model!r} at {self.config.url}"

    async def _answered_error(self, client: triton_aio.InferenceServerClient,
                              message: str) -> GatewayError:
        """What an error the remote sent in the stream means: a model it does not have,
        or a failure of the model it has."""
        try:
            ready = await client.is_model_ready(self.config.remote_model)
        except (InferenceServerException, grpc.RpcError):
            ready = True  # cannot tell: report the error as it came
        if not ready:
            return UnknownModel(f"model {self.config.name!r} is served by {self.config.url}, "
                                f"which has no model {self.config.remote_model!r} ready: "
                                f"{message}")
        return UpstreamFailed(f"{self._where()} failed: {message}")

    def _call_error(self, code: str, details: str) -> GatewayError:
        """A failed call to the remote server (gRPC status `code`)."""
        if code == grpc.StatusCode.NOT_FOUND.name:
            return UnknownModel(f"{self._where()}: {details}")
        return UpstreamFailed(f"{self._where()} is unreachable or failed ({code}): {details}")

    async def astream(self, prompt: EncodedPrompt, params: SamplingParams,
                      cancelled: threading.Event) -> AsyncIterator[Piece]:
        client = triton_aio.InferenceServerClient(self.config.url)

        async def requests() -> AsyncIterator[dict[str, object]]:
            yield {"model_name": self.config.remote_model,
                   "inputs": self.convention.inputs(prompt.text, params)}

        count, prompt_tokens = 0, 0
        try:
            async for result, error in client.stream_infer(requests()):
                if error is not None:
                    raise await self._answered_error(client, error.message())
                if cancelled.is_set():
                    return
                count += 1
                p = result.get_response().parameters
                text = result.as_numpy(OUTPUT).reshape(-1)[0].decode("utf-8")
                final = "triton_final_response" in p and p["triton_final_response"].bool_param
                finish = p["finish_reason"].string_param if "finish_reason" in p else "stop"
                tokens = p["completion_tokens"].int64_param if "completion_tokens" in p \
                    else count
                if "prompt_tokens" in p:
                    prompt_tokens = p["prompt_tokens"].int64_param
                yield Piece(text, int(tokens), int(prompt_tokens), finish if final else "")
                if final:
                    return
            # The stream ended with no response flagged final: the server sent the final
            # flag on its own (an empty final response, which this client is not sent).
            yield Piece("", count, prompt_tokens, "stop")
        except grpc.aio.AioRpcError as exc:  # the stream itself failed: refused, reset, ...
            raise self._call_error(exc.code().name, exc.details() or "") from None
        except InferenceServerException as exc:
            status = (exc.status() or "").removeprefix("StatusCode.")
            raise self._call_error(status or "UNKNOWN", exc.message()) from None
        finally:
            await client.close()

    def retire(self) -> None:
        """Nothing held here: each request opens and closes its own channel."""

    def close(self) -> None:
        """Nothing held here either."""
