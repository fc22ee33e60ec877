"""A backend on onnxruntime: the exporter's ONNX decoder graph, stepped with its KV cache.

The prompt runs once with an empty cache; every later step feeds only the last
sampled token and the cache the previous step returned (lmforge.onnx_decoder),
so a step's cost no longer grows with the output as it did with the old
logits-only graph, which re-ran the whole sequence for each token
(benchmarks/onnx_decode.py measures both). An export without the cache inputs
is refused at load with what to do, never served the slow way. Sampling and
incremental detokenisation are the PyTorch engine's (decoding.py), so a seeded
request gives the same text on either backend.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lmforge.modeling import load_tokenizer
from lmforge.onnx_decoder import DecoderCache, OnnxDecoder
from services.inference_gateway.engines.base import EncodedPrompt
from services.inference_gateway.engines.in_process import InProcessEngine
from services.inference_gateway.engines.int4_report import Int4Report


class OnnxEngine(InProcessEngine):
    """The exported directory's onnx/model.onnx, with the tokenizer of its hf/ directory."""

    def __init__(self, export_dir: Path, *, version: str, threads: int = 0) -> None:
        self.decoder = OnnxDecoder(export_dir / "onnx" / "model.onnx", threads=threads)
        self.tokenizer = load_tokenizer(export_dir / "hf")
        config = json.loads((export_dir / "hf" / "config.json").read_text())
        self.eos_token_id: int = config["eos_token_id"]
        self.context_length: int = config["max_position_embeddings"]
        self.version = version
        self.int4_report: Int4Report | None = None

    def next_logits_fn(self, prompt: EncodedPrompt) -> Callable[[int | None], torch.Tensor]:
        cache: DecoderCache | None = None

        def next_logits(token: int | None) -> torch.Tensor:
            nonlocal cache
            ids = prompt.token_ids if token is None else (token,)
            logits, cache = self.decoder.forward(np.array([ids], np.int64), cache)
            return torch.from_numpy(logits[0, -1])

        return next_logits
