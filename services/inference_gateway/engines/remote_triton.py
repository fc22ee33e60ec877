"""A backend that forwards to a remote Triton (or any KServe v2 gRPC) server.

For deployments where the model runs in Triton Inference Server (the
exporter's model repository) and lmforge's gateway stays the front door:
limits, back-pressure, metrics and the three APIs are the gateway's; the
tokens come from the remote model's decoupled `ModelStreamInfer`, speaking
the LLM convention (text_input/max_tokens/temperature/top_p/seed ->
text_output). Tested against a second lmforge gateway, which speaks the same
protocol.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from services.inference_gateway.engines.torch import Piece, RequestError, SamplingParams


class RemoteTritonEngine:
    def __init__(self, url: str, remote_model: str, *, version: str = "remote") -> None:
        self.url = url
        self.remote_model = remote_model
        self.version = version

    def encode_prompt(self, prompt: str, max_new_tokens: int) -> str:
        """The remote side tokenizes; the prompt travels as text."""
        if not prompt:
            raise RequestError("prompt is empty")
        return prompt

    @staticmethod
    def _inputs(prompt: str, params: SamplingParams) -> list[InferInput]:
        def tensor(name, datatype, value, dtype):
            t = InferInput(name, [1], datatype)
            t.set_data_from_numpy(np.array([value], dtype=dtype))
            return t

        return [tensor("text_input", "BYTES", prompt.encode(), np.object_),
                tensor("max_tokens", "INT32", params.max_new_tokens, np.int32),
                tensor("temperature", "FP32", params.temperature, np.float32),
                tensor("top_p", "FP32", params.top_p, np.float32),
                tensor("seed", "UINT64", params.seed, np.uint64)]

    async def astream(self, prompt: str, params: SamplingParams, cancelled: threading.Event
                      ) -> AsyncIterator[Piece]:
        client = triton_aio.InferenceServerClient(self.url)

        async def requests():
            yield {"model_name": self.remote_model, "inputs": self._inputs(prompt, params)}

        count = 0
        try:
            async for result, error in client.stream_infer(requests()):
                if error is not None:
                    raise RequestError(f"remote model {self.remote_model!r} at {self.url}: "
                                       f"{error}")
                if cancelled.is_set():
                    return
                count += 1
                response = result.get_response()
                p = response.parameters
                text = result.as_numpy("text_output")[0].decode("utf-8")
                final = p["triton_final_response"].bool_param if \
                    "triton_final_response" in p else False
                finish = (p["finish_reason"].string_param if "finish_reason" in p
                          else ("length" if final else ""))
                tokens = p["completion_tokens"].int64_param if "completion_tokens" in p \
                    else count
                prompt_tokens = p["prompt_tokens"].int64_param if "prompt_tokens" in p else 0
                yield Piece(text, int(tokens), int(prompt_tokens), finish if final else "")
                if final:
                    return
        except InferenceServerException as exc:
            raise RequestError(f"remote model {self.remote_model!r} at {self.url}: "
                               f"{exc.message()}") from None
        finally:
            await client.close()
