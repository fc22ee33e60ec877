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

from lmforge.modeling import load_causal_lm, load_tokenizer
from services.inference_gateway.engines.base import (
    EncodedPrompt,
)
from services.inference_gateway.engines.in_process import InProcessEngine


def load_serving_model(model_dir: Path, dtype: str, device: str) -> PreTrainedModel:
    """The model in eval mode on `device` ("cpu", "cuda", "cuda:1") with fp32 or bf16
    weights; a device that is not there is refused here, before anything is served."""
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype {dtype!r} must be fp32 or bf16")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    model = load_causal_lm(model_dir,
                           dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    # Module.to moves the weights in place. It is called through the base type:
    # transformers wraps PreTrainedModel.to in a way type checkers cannot bind.
    as_module: torch.nn.Module = model
    as_module.to(device)
    return model.eval()


class TorchEngine(InProcessEngine):
    """A PyTorch model generating one request per call."""

    def __init__(self, model_dir: Path, *, version: str, dtype: str = "fp32",
                 device: str = "cpu") -> None:
        self.version = version
        self.model = load_serving_model(model_dir, dtype, device)
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
