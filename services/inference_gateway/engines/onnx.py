"""A backend on onnxruntime: the exporter's ONNX logits graph.

The exported graph maps input_ids [batch, sequence] to logits without a KV
cache, so each new token re-runs the whole sequence: correct and dependency-
light (no torch kernels at serving time beyond sampling), but O(n²) in the
generated length — use the PyTorch backend for long generations. Sampling and
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
from services.inference_gateway.engines.base import (
    EncodedPrompt,
)
from services.inference_gateway.engines.in_process import InProcessEngine


class OnnxEngine(InProcessEngine):
    """The exported directory's onnx/model.onnx, with the tokenizer of its hf/ directory."""

    def __init__(self, export_dir: Path, *, version: str, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(export_dir / "onnx" / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.tokenizer = load_tokenizer(export_dir / "hf")
        config = json.loads((export_dir / "hf" / "config.json").read_text())
        self.eos_token_id: int = config["eos_token_id"]
        self.context_length: int = config["max_position_embeddings"]
        self.version = version

    def next_logits_fn(self, prompt: EncodedPrompt) -> Callable[[int | None], torch.Tensor]:
        ids = list(prompt.token_ids)

        def next_logits(token: int | None) -> torch.Tensor:
            if token is not None:
                ids.append(token)
            logits = self.session.run(["logits"], {"input_ids": np.array([ids], np.int64)})[0]
            return torch.from_numpy(logits[0, -1])

        return next_logits
