"""The input tensors a remote Triton LLM model takes, in each convention the gateway speaks.

Triton's LLM backends do not agree on a request's shape, so a remote model is
configured with its convention (`name=host:port/model@vllm`):

- `lmforge` (the default): another lmforge gateway's KServe endpoint —
  text_input BYTES, max_tokens INT32, temperature FP32, top_p FP32, top_k INT32,
  seed UINT64, each of shape [1].
- `vllm`: Triton's vLLM backend (max_batch_size 0, so shape [1]) — text_input
  BYTES, stream BOOL, sampling_parameters BYTES (vLLM's SamplingParams as JSON:
  max_tokens, temperature, top_p, top_k, and seed when one was asked for),
  exclude_input_in_output BOOL (the prompt is not echoed back).
- `trtllm`: the TensorRT-LLM backend's `ensemble` model (batched, so shape
  [1, 1]) — text_input BYTES, max_tokens INT32, temperature FP32, top_p FP32,
  top_k INT32, random_seed UINT64, stream BOOL.

Each sends exactly its tensors, every one every time, so a server that checks
names strictly accepts the request. Where the gateway's meaning of a value
differs from the backend's, the value is translated here, not passed through:
vLLM and TensorRT-LLM reject top_p 0 (the gateway's "off") and get 1.0; vLLM
disables top_k with -1; TensorRT-LLM decodes greedily at top_k 1 (the gateway
says temperature 0); a seed of 0 (the gateway's "fresh randomness") is no seed
for vLLM and a fresh random seed for TensorRT-LLM, whose own default is a fixed 0.
"""

from __future__ import annotations

import json
import secrets
from typing import Protocol

import numpy as np
import numpy.typing as npt
from tritonclient.grpc import InferInput

from services.inference_gateway.engines.base import SamplingParams

OUTPUT = "text_output"


def tensor(name: str, datatype: str, value: object, dtype: npt.DTypeLike,
           shape: tuple[int, ...] = (1,)) -> InferInput:
    """One request tensor holding the single `value`, of `shape` ([1] or [1, 1])."""
    result = InferInput(name, list(shape), datatype)
    result.set_data_from_numpy(np.array([value], dtype=dtype).reshape(shape))
    return result


def _nucleus(top_p: float) -> float:
    """top_p for backends that want it in (0, 1]: the gateway's 0 (off) is 1.0."""
    return top_p if 0 < top_p < 1 else 1.0


class LlmConvention(Protocol):
    """How one family of remote LLM models wants a generation request."""

    name: str

    def inputs(self, prompt: str, params: SamplingParams) -> list[InferInput]:
        """The request's input tensors for `prompt` sampled with `params`."""
        ...


class LmforgeConvention:
    """Another lmforge gateway's KServe v2 endpoint (api/kserve.py)."""

    name = "lmforge"

    def inputs(self, prompt: str, params: SamplingParams) -> list[InferInput]:
        return [tensor("text_input", "BYTES", prompt.encode(), np.object_),
                tensor("max_tokens", "INT32", params.max_new_tokens, np.int32),
                tensor("temperature", "FP32", params.temperature, np.float32),
                tensor("top_p", "FP32", params.top_p, np.float32),
                tensor("top_k", "INT32", params.top_k, np.int32),
                tensor("seed", "UINT64", params.seed, np.uint64)]


class VllmConvention:
    """Triton's vLLM backend (triton-inference-server/vllm_backend)."""

    name = "vllm"

    @staticmethod
    def sampling_parameters(params: SamplingParams) -> dict[str, object]:
        sampling: dict[str, object] = {
            "max_tokens": params.max_new_tokens, "temperature": params.temperature,
            "top_p": _nucleus(params.top_p), "top_k": params.top_k or -1}
        if params.seed:
            sampling["seed"] = params.seed
        return sampling

    def inputs(self, prompt: str, params: SamplingParams) -> list[InferInput]:
        sampling = json.dumps(self.sampling_parameters(params)).encode()
        return [tensor("text_input", "BYTES", prompt.encode(), np.object_),
                tensor("stream", "BOOL", True, np.bool_),
                tensor("sampling_parameters", "BYTES", sampling, np.object_),
                tensor("exclude_input_in_output", "BOOL", True, np.bool_)]


class TrtLlmEnsembleConvention:
    """The TensorRT-LLM backend's `ensemble` model (triton-inference-server/
    tensorrtllm_backend, all_models/inflight_batcher_llm)."""

    name = "trtllm"

    def inputs(self, prompt: str, params: SamplingParams) -> list[InferInput]:
        greedy = params.temperature == 0
        shape = (1, 1)
        return [tensor("text_input", "BYTES", prompt.encode(), np.object_, shape),
                tensor("max_tokens", "INT32", params.max_new_tokens, np.int32, shape),
                tensor("temperature", "FP32", 1.0 if greedy else params.temperature,
                       np.float32, shape),
                tensor("top_p", "FP32", 1.0 if greedy else _nucleus(params.top_p),
                       np.float32, shape),
                tensor("top_k", "INT32", 1 if greedy else params.top_k, np.int32, shape),
                tensor("random_seed", "UINT64", params.seed or secrets.randbits(63),
                       np.uint64, shape),
                tensor("stream", "BOOL", True, np.bool_, shape)]


CONVENTIONS: dict[str, LlmConvention] = {
    c.name: c for c in (LmforgeConvention(), VllmConvention(), TrtLlmEnsembleConvention())}


def convention_named(name: str) -> LlmConvention:
    """The convention called `name`; raises ValueError listing the known ones."""
    if name not in CONVENTIONS:
        raise ValueError(f"remote convention {name!r} is not one of {sorted(CONVENTIONS)}")
    return CONVENTIONS[name]
