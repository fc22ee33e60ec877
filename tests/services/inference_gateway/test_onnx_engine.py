"""The onnxruntime backend generates what the PyTorch backend generates."""

from __future__ import annotations

import shutil

from services.exporter.onnx_export import export_logits_onnx
from services.inference_gateway.engines.base import SamplingParams
from services.inference_gateway.engines.onnx import OnnxEngine
from services.inference_gateway.engines.torch import TorchEngine


def test_onnx_backend_matches_torch_greedy_and_seeded(tmp_path, trained_model):
    from lmforge.modeling import load_causal_lm

    export = tmp_path / "export"
    shutil.copytree(trained_model.path, export / "hf")
    model = load_causal_lm(trained_model.path)
    export_logits_onnx(model, export / "onnx" / "model.onnx",
                       max_seq_len=model.config.max_position_embeddings)
    torch_engine = TorchEngine(export / "hf", version="t")
    onnx_engine = OnnxEngine(export, version="o")
    for params in (SamplingParams(max_new_tokens=10),
                   SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=3)):
        ids = torch_engine.encode_prompt("A fortune:")
        want = list(torch_engine.stream(ids, params))
        got = list(onnx_engine.stream(onnx_engine.encode_prompt("A fortune:"), params))
        assert "".join(p.text for p in got) == "".join(p.text for p in want)
        assert got[-1].finish_reason == want[-1].finish_reason
