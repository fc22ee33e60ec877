"""The exported Triton model repository: a config.pbtxt that Triton's own ModelConfig
message parses strictly, naming every tensor of the graph with its type and rank."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from services.exporter.packaging import ONNX_GRAPH, TRITON_REPOSITORY
from services.exporter.triton_repository import (
    TritonModelOptions,
    UnservableGraphError,
    write_triton_repository,
)
from tests.services.exporter.conftest import TRITON_NAME

# onnxruntime's type strings, read independently of the exporter's ONNX -> Triton table.
ORT_TO_TRITON = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64",
                 "tensor(float16)": "TYPE_FP16", "tensor(int32)": "TYPE_INT32"}


def _parsed_config(model_dir):
    # text_format.Parse (not Merge) rejects unknown fields and repeated scalars.
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())


def test_config_pbtxt_parses_strictly_and_matches_the_graph(export_dir):
    work, report = export_dir
    model_dir = work / TRITON_REPOSITORY / TRITON_NAME
    config = _parsed_config(model_dir)
    assert report.triton_model == config.name == TRITON_NAME
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 4
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (mc.ModelInstanceGroup.KIND_CPU, 1)]
    # The served file is the checked graph, where Triton looks for version 1.
    assert (model_dir / "1" / "model.onnx").read_bytes() == (work / ONNX_GRAPH).read_bytes()
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    for declared, actual in ((config.input, session.get_inputs()),
                             (config.output, session.get_outputs())):
        assert [t.name for t in declared] == [a.name for a in actual]
        for tensor, arg in zip(declared, actual, strict=True):
            assert mc.DataType.Name(tensor.data_type) == ORT_TO_TRITON[arg.type], tensor.name
            # max_batch_size > 0: dims leave out the batch axis, which leads every tensor.
            assert len(tensor.dims) + 1 == len(arg.shape), tensor.name
            assert isinstance(arg.shape[0], str)
            for dim, axis in zip(tensor.dims, arg.shape[1:], strict=True):
                assert dim == (axis if isinstance(axis, int) else -1), (tensor.name, axis)
    names = {t.name for t in config.input}
    assert {"input_ids", "attention_mask", "position_ids", "past_key_values.0.key"} <= names


def test_a_config_with_a_misspelt_field_does_not_parse(export_dir):
    """The strictness the test above relies on: Parse refuses what Triton would refuse."""
    work, _ = export_dir
    text = (work / TRITON_REPOSITORY / TRITON_NAME / "config.pbtxt").read_text()
    with pytest.raises(text_format.ParseError):
        text_format.Parse(text.replace("max_batch_size", "max_batch"), mc.ModelConfig())


def test_a_graph_without_a_batch_axis_is_refused(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [x], [y])
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "static.onnx"))
    with pytest.raises(UnservableGraphError, match="input 'x' has no dynamic batch axis"):
        write_triton_repository(tmp_path / "static.onnx", tmp_path / "repo",
                                TritonModelOptions(name="static"))


def test_a_model_name_that_is_not_a_directory_name_is_refused():
    with pytest.raises(ValueError, match="must be letters, digits"):
        TritonModelOptions(name="../escape")


# Starts child processes (engine processes, the CLI, model exports): not in `make unit`.
pytestmark = pytest.mark.processes
