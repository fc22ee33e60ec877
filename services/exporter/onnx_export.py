"""ONNX export of the logits graph, checked against PyTorch in onnxruntime.

The graph takes `input_ids` [batch, sequence] (int64) and returns `logits`
[batch, sequence, vocab], both axes dynamic. It is exported with the dynamo
exporter (the TorchScript one is deprecated) and then run in onnxruntime on
held-out token windows of two different shapes; the largest absolute
difference to PyTorch's logits is reported and must stay under a tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmforge.failures import BadInput

ONNX_OPSET = 18


class LogitsOnly(torch.nn.Module):
    """input_ids -> logits, without the KV cache outputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class OnnxMismatchError(BadInput, RuntimeError):
    pass


def export_logits_onnx(model: torch.nn.Module, path: Path, *, max_seq_len: int) -> None:
    from torch.export import Dim

    wrapper = LogitsOnly(model).eval()
    example = torch.zeros((2, min(16, max_seq_len)), dtype=torch.long)
    batch = Dim("batch", min=1, max=1024)
    sequence = Dim("sequence", min=2, max=max_seq_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        wrapper, (example,), str(path), dynamo=True, opset_version=ONNX_OPSET,
        input_names=["input_ids"], output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: sequence}},
        external_data=False, verbose=False,
    )


def check_onnx_against_torch(model: torch.nn.Module, path: Path, tokens: np.ndarray, *,
                             max_seq_len: int, tolerance: float = 1e-3) -> float:
    """Max |logits_ort - logits_torch| over two input shapes; raises above tolerance."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper = LogitsOnly(model).eval()
    worst = 0.0
    for batch, seq in ((1, min(7, max_seq_len)), (3, max_seq_len)):
        needed = batch * seq
        source = np.resize(tokens, needed) if len(tokens) < needed else tokens[:needed]
        ids = source.reshape(batch, seq).astype(np.int64)
        with torch.inference_mode():
            expected = wrapper(torch.from_numpy(ids)).float().numpy()
        got = session.run(["logits"], {"input_ids": ids})[0]
        if got.shape != expected.shape:
            raise OnnxMismatchError(f"ONNX logits shape {got.shape} != PyTorch {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    if not worst <= tolerance:
        raise OnnxMismatchError(
            f"ONNX logits differ from PyTorch by {worst:.3g} (tolerance {tolerance})"
        )
    return worst
