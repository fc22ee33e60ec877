"""An int8 copy of the decoder graph, through onnxruntime's dynamic quantization, and the
held-out perplexity that prices it.

Weights of every MatMul become int8 (per output channel), activations are
quantized on the fly (MatMulInteger): about a quarter of the fp32 weight bytes,
served by any onnxruntime without a calibration set. Its held-out perplexity is
measured next to the fp32 graph's in the same runtime and both go into
model.exported, so the price in quality is a figure, not a guess.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lmforge.onnx_decoder import OnnxDecoder


def quantize_decoder_int8(source: Path, target: Path) -> None:
    """Write the dynamic-int8 version of the graph at `source` to `target`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic logs a pre-processing suggestion through the root logger on every
    # call; it concerns static (calibrated) quantization of vision models, not this.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)


def heldout_perplexity(decoder: OnnxDecoder, windows: np.ndarray, *, batch_size: int = 16
                       ) -> float:
    """exp(mean next-token cross-entropy) of the graph over `windows` [count, seq_len]
    (lmforge.modeling.evaluation_windows), computed in onnxruntime."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows of shape {windows.shape}: need [count, >= 2 tokens]")
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size].astype(np.int64)
        logits = decoder.forward(batch)[0][:, :-1].astype(np.float64)
        targets = batch[:, 1:]
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=-1))
        picked = np.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]
        total_loss += float((log_norm - picked).sum())
        total_tokens += targets.size
    return float(np.exp(total_loss / total_tokens))
