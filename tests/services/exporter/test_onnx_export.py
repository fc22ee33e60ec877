from __future__ import annotations

import numpy as np
import onnx
import pytest

from lmforge.modeling import load_causal_lm, load_token_stream
from services.exporter.onnx_export import (
    OnnxMismatchError,
    check_onnx_against_torch,
    export_logits_onnx,
)


def test_onnx_matches_pytorch_on_dynamic_shapes(tmp_path, trained_model, prepared_dataset):
    model = load_causal_lm(trained_model.path)
    path = tmp_path / "model.onnx"
    export_logits_onnx(model, path, max_seq_len=model.config.max_position_embeddings)
    graph = onnx.load(str(path)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "sequence"]
    heldout = load_token_stream(prepared_dataset.path, "heldout")
    diff = check_onnx_against_torch(model, path, heldout,
                                    max_seq_len=model.config.max_position_embeddings)
    assert diff < 1e-4
    # A graph that no longer matches the weights is refused, not shipped.
    with np.errstate(all="ignore"):
        for p in model.parameters():
            p.data.mul_(1.5)
    with pytest.raises(OnnxMismatchError, match="differ from PyTorch"):
        check_onnx_against_torch(model, path, heldout,
                                 max_seq_len=model.config.max_position_embeddings)


# Starts child processes (engine processes, the CLI, model exports): not in `make unit`.
pytestmark = pytest.mark.processes
