"""One export directory from a loaded model: what the exporter stores and announces.

    hf/                         Hugging Face directory: the served weights
                                (served_weights.py) + tokenizer files
    onnx/model.onnx             decoder with KV cache, checked against PyTorch
    onnx/model.int8.onnx        onnxruntime dynamic int8 copy (when asked)
    model_repository/<name>/    Triton model repository around onnx/model.onnx
    export.json                 the figures below and the provenance the handler
                                gives (sources, served weights, eval figures)

The handler writes the served weights into hf/ and stores the directory;
everything between is here, callable without a bus.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedModel

from lmforge.modeling import evaluation_windows
from lmforge.onnx_decoder import OnnxDecoder
from services.exporter.onnx_export import (
    ONNX_OPSET,
    check_decode_against_torch,
    export_decoder_onnx,
)
from services.exporter.onnx_int8 import heldout_perplexity, quantize_decoder_int8
from services.exporter.triton_repository import TritonModelOptions, write_triton_repository

ONNX_GRAPH = Path("onnx") / "model.onnx"
ONNX_INT8_GRAPH = Path("onnx") / "model.int8.onnx"
TRITON_REPOSITORY = Path("model_repository")


@dataclass(frozen=True, kw_only=True, slots=True)
class ExportOptions:
    tolerance: float
    """Largest accepted |ORT - PyTorch| logit over the cached decode."""
    int8: bool
    """Also write and measure the int8 graph."""
    perplexity_windows: int
    """Held-out windows for the ONNX graphs' perplexity."""
    triton: TritonModelOptions
    """The Triton model's name, batching and instances."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ExportReport:
    onnx_max_abs_diff: float
    onnx_parity_steps: int
    onnx_opset: int
    onnx_heldout_perplexity: float
    onnx_int8_heldout_perplexity: float
    """0 when no int8 graph was written."""
    triton_model: str


def _copy_tokenizer_files(model_dir: Path, hf_dir: Path) -> None:
    for item in model_dir.iterdir():
        if item.is_file() and item.suffix == ".json" and item.name.startswith(
            ("tokenizer", "special_tokens", "generation")
        ):
            shutil.copy2(item, hf_dir / item.name)


def write_export(model: PreTrainedModel, model_dir: Path, heldout: np.ndarray, work: Path,
                 options: ExportOptions, provenance: dict[str, Any]) -> ExportReport:
    """Complete the export in `work` of the served `model` (an fp32 transformers model of
    the weights in work/hf/): tokenizer files from `model_dir`, the ONNX graphs checked
    on `heldout` tokens, the Triton repository, export.json. Raises OnnxMismatchError
    on a graph that does not match PyTorch."""
    hf_dir = work / "hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    _copy_tokenizer_files(model_dir, hf_dir)
    max_seq = model.config.max_position_embeddings
    graph = work / ONNX_GRAPH
    export_decoder_onnx(model, graph, max_seq_len=max_seq)
    diff, steps = check_decode_against_torch(model, graph, heldout, max_seq_len=max_seq,
                                             tolerance=options.tolerance)
    windows = evaluation_windows(heldout, max_seq, options.perplexity_windows)
    perplexity = heldout_perplexity(OnnxDecoder(graph), windows)
    int8_perplexity = 0.0
    if options.int8:
        quantize_decoder_int8(graph, work / ONNX_INT8_GRAPH)
        int8_perplexity = heldout_perplexity(OnnxDecoder(work / ONNX_INT8_GRAPH), windows)
    write_triton_repository(graph, work / TRITON_REPOSITORY, options.triton)
    report = ExportReport(onnx_max_abs_diff=diff, onnx_parity_steps=steps,
                          onnx_opset=ONNX_OPSET, onnx_heldout_perplexity=perplexity,
                          onnx_int8_heldout_perplexity=int8_perplexity,
                          triton_model=options.triton.name)
    (work / "export.json").write_text(json.dumps({**provenance, **asdict(report)}, indent=1))
    return report
