"""A backend on onnxruntime: the exporter's ONNX logits graph.

The exported graph maps input_ids [batch, sequence] to logits without a KV
cache, so each new token re-runs the whole sequence: correct and dependency-
light (no torch kernels at serving time beyond sampling), but O(n²) in the
generated length — use the PyTorch backend for long generations. Sampling and
incremental detokenisation are the PyTorch engine's, so a seeded request gives
the same text on either backend.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lmforge.modeling import load_tokenizer
from services.inference_gateway.engines.torch import (
    Piece,
    SamplingParams,
    encode_prompt,
    request_rng,
    sample_next,
)


class OnnxEngine:
    def __init__(self, export_dir: Path, *, version: str, threads: int = 0) -> None:
        import json

        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(export_dir / "onnx" / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.tokenizer = load_tokenizer(export_dir / "hf")
        config = json.loads((export_dir / "hf" / "config.json").read_text())
        self.eos_token_id = config["eos_token_id"]
        self.context_length = config["max_position_embeddings"]
        self.version = version

    def encode_prompt(self, prompt: str, max_new_tokens: int) -> list[int]:
        return encode_prompt(self.tokenizer, self.context_length, prompt)

    def stream(self, prompt_ids: list[int], params: SamplingParams,
               cancelled: threading.Event | None = None) -> Iterator[Piece]:
        rng = request_rng(params.seed)
        ids = list(prompt_ids)
        generated: list[int] = []
        sent, finish = "", "length"
        for _ in range(min(params.max_new_tokens, self.context_length - len(prompt_ids))):
            if cancelled is not None and cancelled.is_set():
                finish = "cancelled"
                break
            logits = self.session.run(["logits"], {"input_ids": np.array([ids], np.int64)})[0]
            token = sample_next(torch.from_numpy(logits[0, -1]), params, rng)
            if token == self.eos_token_id:
                finish = "eos"
                break
            ids.append(token)
            generated.append(token)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if not text.endswith("\ufffd") and len(text) > len(sent):
                yield Piece(text[len(sent):], len(generated), len(prompt_ids))
                sent = text
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        yield Piece(text[len(sent):], len(generated), len(prompt_ids), finish)
