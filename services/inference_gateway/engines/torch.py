"""The single-request PyTorch engine: one generation per call, with the model's KV cache.

`LMFORGE_GATEWAY_BATCHING=false` serves with it (MAX_CONCURRENCY requests at
once, each stepped in a worker thread); tests use it as the reference that
continuous batching must match. `load_serving_model` is shared with the engine
process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel

from lmforge.modeling import (
    is_awq_model,
    load_causal_lm,
    load_dequantized_model,
    load_tokenizer,
)
from services.inference_gateway.engines.base import (
    EncodedPrompt,
)
from services.inference_gateway.engines.in_process import InProcessEngine
from services.inference_gateway.engines.int4_model import (
    cuda_kernel_available,
    dequantised_report,
    load_int4_model,
)
from services.inference_gateway.engines.int4_report import Int4Report


def load_serving_model(model_dir: Path, dtype: str, device: str) -> PreTrainedModel:
    """The model in eval mode on `device` ("cpu", "cuda", "cuda:1"); see
    `load_serving_model_reporting`."""
    return load_serving_model_reporting(model_dir, dtype, device)[0]


def load_serving_model_reporting(model_dir: Path, dtype: str, device: str
                                 ) -> tuple[PreTrainedModel, Int4Report | None]:
    """The model in eval mode on `device` with fp32 or bf16 weights, or int4 Linears
    where `model_dir` is AWQ-packed (on the CPU, or a GPU tinygemm runs on), and for a
    packed model which of its layers are not int4 and why (None: not packed); a device
    that is not there is refused here, before anything is served."""
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype {dtype!r} must be fp32 or bf16")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    if is_awq_model(model_dir):
        usable, why_not = (True, "") if device == "cpu" else cuda_kernel_available(device)
        if usable:
            return load_int4_model(model_dir, torch_dtype, device)
        model = load_dequantized_model(model_dir)
        as_module: torch.nn.Module = model
        as_module.to(device=device, dtype=torch_dtype)
        return model.eval(), dequantised_report(model_dir, why_not)
    model = load_causal_lm(model_dir, dtype=torch_dtype)
    # Module.to moves the weights in place. It is called through the base type:
    # transformers wraps PreTrainedModel.to in a way type checkers cannot bind.
    fp_module: torch.nn.Module = model
    fp_module.to(device)
    return model.eval(), None


class TorchEngine(InProcessEngine):
    """A PyTorch model generating one request per call."""

    def __init__(self, model_dir: Path, *, version: str, dtype: str = "fp32",
                 device: str = "cpu") -> None:
        self.version = version
        self.model, self.int4_report = load_serving_model_reporting(model_dir, dtype, device)
        self.tokenizer = load_tokenizer(model_dir)
        self.eos_token_id: int = self.model.config.eos_token_id
        self.context_length: int = self.model.config.max_position_embeddings

    def next_logits_fn(self, prompt: EncodedPrompt) -> Callable[[int | None], torch.Tensor]:
        device = self.model.device
        cache = None

        def next_logits(token: int | None) -> torch.Tensor:
            nonlocal cache
            ids = prompt.token_ids if token is None else (token,)
            # inference_mode is thread-local and this generator is stepped from
            # worker threads: enter it around each forward, never across a yield.
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([ids], device=device), cache=cache,
                                 use_cache=True)
            cache = out.cache
            return out.logits[0, -1]

        return next_logits
