"""The exported decoder graph carries a KV cache and decodes what PyTorch decodes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from lmforge.modeling import load_causal_lm, load_token_stream, perplexity
from lmforge.onnx_decoder import OnnxDecoder, cache_input_names, cache_output_names
from services.exporter.onnx_export import (
    PARITY_STEPS,
    OnnxMismatchError,
    check_decode_against_torch,
    parity_steps,
)
from services.exporter.packaging import ONNX_GRAPH, ONNX_INT8_GRAPH


def test_graph_has_cache_inputs_and_outputs_with_dynamic_batch_sequence_and_past(export_dir):
    work, _ = export_dir
    graph = onnx.load(str(work / ONNX_GRAPH)).graph

    def axes(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in values}

    inputs, outputs = axes(graph.input), axes(graph.output)
    assert inputs["input_ids"] == ["batch", "sequence"]
    assert inputs["position_ids"] == ["batch", "sequence"]
    assert inputs["attention_mask"][0] == "batch"
    assert isinstance(inputs["attention_mask"][1], str)
    layers = 2  # the test-tiny preset
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids",
                            *cache_input_names(layers)]
    assert list(outputs) == ["logits", *cache_output_names(layers)]
    for name in cache_input_names(layers):
        batch, heads, past, head_dim = inputs[name]
        assert (batch, past) == ("batch", "past_sequence") and heads > 0 and head_dim > 0
    for name in cache_output_names(layers):
        assert outputs[name][0] == "batch" and isinstance(outputs[name][2], str)


def test_cached_decode_matches_pytorch_over_32_steps(export_dir, trained_model,
                                                     prepared_dataset):
    work, report = export_dir
    assert report.onnx_parity_steps == PARITY_STEPS == 32
    assert report.onnx_max_abs_diff < 1e-4
    model = load_causal_lm(trained_model.path)
    heldout = load_token_stream(prepared_dataset.path, "heldout")
    diff, steps = check_decode_against_torch(model, work / ONNX_GRAPH, heldout,
                                             max_seq_len=model.config.max_position_embeddings)
    assert diff < 1e-4 and steps == 32
    # A graph that no longer matches the weights is refused, not shipped.
    for p in model.parameters():
        p.data.mul_(1.5)
    with pytest.raises(OnnxMismatchError, match="over 32 cached decode steps"):
        check_decode_against_torch(model, work / ONNX_GRAPH, heldout,
                                   max_seq_len=model.config.max_position_embeddings)


def test_a_short_context_checks_as_many_steps_as_fit():
    """A 32-token context (the e2e tests' data-prep setting) cannot hold a prompt and 32
    steps: the check runs 30 and says so, instead of refusing the export."""
    assert parity_steps(32) == 30 and parity_steps(64) == PARITY_STEPS
    with pytest.raises(ValueError, match="no room"):
        parity_steps(2)


def test_each_step_extends_the_cache_by_the_tokens_fed(export_dir):
    work, _ = export_dir
    decoder = OnnxDecoder(work / ONNX_GRAPH)
    logits, cache = decoder.forward(np.array([[5, 6, 7, 8]] * 2))
    assert logits.shape[:2] == (2, 4) and cache.length == 4
    for _ in range(3):
        logits, cache = decoder.forward(np.array([[9], [10]]), cache)
        assert logits.shape[:2] == (2, 1)
    assert cache.length == 7
    assert all(t.shape[0] == 2 and t.shape[2] == 7 for t in cache.tensors)


def test_attention_mask_hides_left_padding(export_dir):
    """Batched clients (Triton's) pad on the left: a padded row's logits are its own."""
    work, _ = export_dir
    decoder = OnnxDecoder(work / ONNX_GRAPH)
    alone = decoder.forward(np.array([[11, 12, 13]]))[0][0]
    empty = decoder.empty_cache(2)
    feeds = {"input_ids": np.array([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13]]),
             "attention_mask": np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]),
             "position_ids": np.array([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])}
    feeds.update(zip(cache_input_names(decoder.num_layers), empty.tensors, strict=True))
    padded = decoder.session.run(["logits"], feeds)[0][1, 2:]
    np.testing.assert_allclose(padded, alone, atol=1e-5)
    feeds["attention_mask"] = np.ones((2, 5), np.int64)  # the mask is not ignored
    assert np.abs(decoder.session.run(["logits"], feeds)[0][1, 2:] - alone).max() > 1e-3


def test_int8_graph_is_smaller_and_its_perplexity_is_reported(export_dir, trained_model,
                                                              prepared_dataset):
    work, report = export_dir
    fp32, int8 = (work / ONNX_GRAPH).stat().st_size, (work / ONNX_INT8_GRAPH).stat().st_size
    assert int8 < 0.6 * fp32
    # The fp32 graph's perplexity, computed in onnxruntime, is PyTorch's on the same windows.
    model = load_causal_lm(trained_model.path)
    expected = perplexity(model, load_token_stream(prepared_dataset.path, "heldout"),
                          seq_len=model.config.max_position_embeddings, max_windows=16)
    assert report.onnx_heldout_perplexity == pytest.approx(expected, rel=1e-4)
    # Dynamic int8 costs a little quality, never a collapse.
    assert 0.9 < report.onnx_int8_heldout_perplexity / report.onnx_heldout_perplexity < 1.1
    written = json.loads((work / "export.json").read_text())
    assert written["onnx_int8_heldout_perplexity"] == report.onnx_int8_heldout_perplexity


# Starts child processes (engine processes, the CLI, model exports): not in `make unit`.
pytestmark = pytest.mark.processes
