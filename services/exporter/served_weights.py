"""Which weights the export serves, written into hf/, and the sentence that says why.

- The quantizer's packed int4 (AutoAWQ GEMM) when it is what model.quantized says
  to serve: copied into hf/ as is, so the served directory is the int4 one
  (quarter-size weights, `quantization_config` in config.json) and no fp32 copy
  is written. The ONNX graph is built from its dequantised weights: onnxruntime
  runs fp32 here, and says so.
- The full-precision model when the quantizer said "fp32" (a failed gate with a
  fallback asked for): its reason is carried on.
- int8 codes, dequantised to fp32 (there is no int8 kernel on the serving path):
  said so too.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.modeling import load_causal_lm, load_dequantized_model
from lmforge.task_eval import serves_full_precision

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True, slots=True)
class ServedWeights:
    precision: str
    """"int4-awq-g128", "int4-rtn-g128" or "fp32"."""
    reason: str
    """Why not the quantizer's method ("" when it is)."""
    model: PreTrainedModel
    """The served weights as an fp32 transformers model, for the ONNX graph and checks."""


def int4_precision(method: str, group_size: int) -> str:
    """"awq-int4", 128 -> "int4-awq-g128"."""
    return f"int4-{method.removesuffix('-int4')}-g{group_size}"


def write_served_weights(event: ev.ModelQuantized, model_dir: Path, quantized_dir: Path,
                         hf_dir: Path) -> ServedWeights:
    """Write the weights to serve into `hf_dir` and say which they are."""
    if serves_full_precision(event):
        model = load_causal_lm(model_dir)
        model.save_pretrained(str(hf_dir), safe_serialization=True)
        return ServedWeights("fp32", event.served_reason or
                             f"{event.method} failed the quality gate", model)
    if event.weight_format == "awq-gemm":
        hf_dir.mkdir(parents=True)
        for item in quantized_dir.iterdir():
            if item.is_file() and item.name != "MANIFEST.json":
                shutil.copy2(item, hf_dir / item.name)
        return ServedWeights(int4_precision(event.method, event.group_size), "",
                             load_dequantized_model(quantized_dir))
    model = load_dequantized_model(quantized_dir)
    model.save_pretrained(str(hf_dir), safe_serialization=True)
    return ServedWeights("fp32", f"{event.method} codes are served dequantised to fp32 "
                                 "(no int8 kernel on the serving path)", model)
