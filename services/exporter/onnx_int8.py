"""An int8 copy of the decoder graph, through onnxruntime's dynamic quantization.

Weights of every MatMul become int8 (per output channel), activations are
quantized on the fly (MatMulInteger): about a quarter of the fp32 weight bytes,
served by any onnxruntime without a calibration set. Its held-out perplexity is
measured next to the fp32 graph's in the same runtime and both go into
model.exported, so the price in quality is a figure, not a guess.
"""

from __future__ import annotations

import logging
from pathlib import Path


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
