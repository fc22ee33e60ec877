"""Running the exporter's ONNX decoder graph in onnxruntime, with its KV cache.

The graph is the contract between the exporter (which writes and checks it) and
the gateway's onnxruntime backend (which serves it), so both read it through
this one module. It follows the naming of Hugging Face Optimum's decoder graphs,
which onnxruntime-genai and Triton clients already know:

  inputs   input_ids [batch, sequence] int64
           attention_mask [batch, past_sequence + sequence] int64 (1 = attend)
           position_ids [batch, sequence] int64
           past_key_values.<layer>.key / .value [batch, kv_heads, past_sequence, head_dim]
  outputs  logits [batch, sequence, vocab]
           present.<layer>.key / .value [batch, kv_heads, past_sequence + sequence, head_dim]

A prompt is run with an empty past (past_sequence 0); each later step feeds only
the new token and the previous step's `present` tensors, so a step costs one
token's worth of compute instead of re-running the whole sequence. numpy and
onnxruntime only: no torch here (libs/ imports without it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
KV_KINDS = ("key", "value")


def past_name(layer: int, kind: str) -> str:
    """The graph input holding layer `layer`'s cached keys or values."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """The graph output holding layer `layer`'s keys or values after this step."""
    return f"present.{layer}.{kind}"


def cache_input_names(num_layers: int) -> list[str]:
    return [past_name(i, k) for i in range(num_layers) for k in KV_KINDS]


def cache_output_names(num_layers: int) -> list[str]:
    return [present_name(i, k) for i in range(num_layers) for k in KV_KINDS]


class NotADecoderGraphError(ValueError):
    """The graph lacks the KV-cache inputs (e.g. an export from before they existed)."""


@dataclass(frozen=True, slots=True)
class DecoderCache:
    """The `present` tensors of the last step (one per layer and kind, in
    `cache_input_names` order) and how many positions they hold."""

    tensors: tuple[np.ndarray, ...]
    length: int


class OnnxDecoder:
    """An onnxruntime session on a decoder graph, stepped with its KV cache."""

    def __init__(self, path: Path, *, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        layers = 0
        while past_name(layers, "key") in inputs:
            layers += 1
        expected = {INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *cache_input_names(layers)}
        if layers == 0 or set(inputs) != expected:
            raise NotADecoderGraphError(
                f"{path} is not a decoder graph with a KV cache: its inputs are "
                f"{sorted(inputs)}; expected input_ids, attention_mask, position_ids and "
                "past_key_values.<layer>.key/value (re-export the model with this "
                "version of the exporter)")
        self.num_layers = layers
        shape = inputs[past_name(0, "key")].shape  # [batch, kv_heads, past, head_dim]
        if not (isinstance(shape[1], int) and isinstance(shape[3], int)):
            raise NotADecoderGraphError(f"{path}: cache shape {shape} has no fixed heads "
                                        "and head size")
        self.kv_heads: int = shape[1]
        self.head_dim: int = shape[3]
        self.cache_dtype = np.float16 if "float16" in inputs[past_name(0, "key")].type \
            else np.float32
        self._outputs = [LOGITS, *cache_output_names(layers)]

    def empty_cache(self, batch: int) -> DecoderCache:
        """The cache before the first token: zero positions."""
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.cache_dtype)
        return DecoderCache(tuple(empty for _ in range(2 * self.num_layers)), 0)

    def forward(self, input_ids: np.ndarray, cache: DecoderCache | None = None
                ) -> tuple[np.ndarray, DecoderCache]:
        """Logits [batch, sequence, vocab] of `input_ids` [batch, sequence] after the
        positions in `cache` (none: a prompt), and the cache that includes them.
        Rows are unpadded: every position attends to every earlier one."""
        batch, sequence = input_ids.shape
        cache = cache or self.empty_cache(batch)
        total = cache.length + sequence
        feeds: dict[str, Any] = {
            INPUT_IDS: input_ids.astype(np.int64, copy=False),
            ATTENTION_MASK: np.ones((batch, total), np.int64),
            POSITION_IDS: np.broadcast_to(np.arange(cache.length, total, dtype=np.int64),
                                          (batch, sequence)).copy(),
        }
        feeds.update(zip(cache_input_names(self.num_layers), cache.tensors, strict=True))
        logits, *present = self.session.run(self._outputs, feeds)
        return logits, DecoderCache(tuple(present), total)

