"""A Triton Inference Server model repository around the exported ONNX graph.

    model_repository/<model>/config.pbtxt
    model_repository/<model>/1/model.onnx

for Triton's onnxruntime backend. The config is built as tritonclient's own
`ModelConfig` protobuf message and printed with protobuf's text_format, so it is
exactly the text Triton parses; every input and output (name, data type, dims)
is read from the graph, never typed by hand, so a graph with more layers or
another vocabulary gets a matching config. The first axis of every tensor is the
batch (`max_batch_size` > 0, so dims leave it out); Triton's dynamic batcher
groups requests whose other dims agree, and an instance group says where the
model runs.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from lmforge.failures import BadInput

if TYPE_CHECKING:
    from onnx import ValueInfoProto

CONFIG_FILE = "config.pbtxt"
MODEL_FILE = "model.onnx"
MODEL_VERSION = "1"
TRITON_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# ONNX TensorProto element types -> Triton data types.
ONNX_TO_TRITON = {
    1: mc.TYPE_FP32, 2: mc.TYPE_UINT8, 3: mc.TYPE_INT8, 4: mc.TYPE_UINT16,
    5: mc.TYPE_INT16, 6: mc.TYPE_INT32, 7: mc.TYPE_INT64, 8: mc.TYPE_STRING,
    9: mc.TYPE_BOOL, 10: mc.TYPE_FP16, 11: mc.TYPE_FP64, 12: mc.TYPE_UINT32,
    13: mc.TYPE_UINT64, 16: mc.TYPE_BF16,
}


class UnservableGraphError(BadInput, ValueError):
    pass


@dataclass(frozen=True, kw_only=True, slots=True)
class TritonModelOptions:
    """How Triton should run the model; the exporter's settings fill it."""

    name: str
    """The model's directory and name in the repository."""
    max_batch_size: int = 8
    """Largest batch Triton's dynamic batcher forms."""
    max_queue_delay_us: int = 1000
    """How long the batcher may hold a request waiting for others."""
    instance_kind: str = "KIND_AUTO"
    """KIND_AUTO (GPU where there is one, else CPU), KIND_CPU or KIND_GPU."""
    instance_count: int = 1
    """Model instances per device."""

    def __post_init__(self) -> None:
        if not TRITON_MODEL_NAME.match(self.name):
            raise ValueError(f"Triton model name {self.name!r} must be letters, digits, "
                             "'_', '.' or '-' (a directory name)")
        if self.instance_kind not in ("KIND_AUTO", "KIND_CPU", "KIND_GPU"):
            raise ValueError(f"instance kind {self.instance_kind!r} must be KIND_AUTO, "
                             "KIND_CPU or KIND_GPU")
        if self.max_batch_size < 1 or self.instance_count < 1 or self.max_queue_delay_us < 0:
            raise ValueError("max_batch_size and instance_count must be >= 1, the queue "
                             "delay >= 0")


def _tensor_config(value: ValueInfoProto, kind: str) -> tuple[str, int, list[int]]:
    """(name, Triton data type, dims without the batch axis) of an ONNX ValueInfo."""
    name = value.name
    tensor = value.type.tensor_type
    if tensor.elem_type not in ONNX_TO_TRITON:
        raise UnservableGraphError(f"{kind} {name!r} has ONNX element type "
                                   f"{tensor.elem_type}, which Triton has no type for")
    dims = list(tensor.shape.dim)
    if not dims or dims[0].HasField("dim_value"):
        raise UnservableGraphError(f"{kind} {name!r} has no dynamic batch axis first "
                                   "(Triton's batcher needs one)")
    return name, ONNX_TO_TRITON[tensor.elem_type], [
        d.dim_value if d.HasField("dim_value") else -1 for d in dims[1:]]


def model_config(onnx_path: Path, options: TritonModelOptions) -> mc.ModelConfig:
    """The ModelConfig of the graph at `onnx_path` under `options`."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    config = mc.ModelConfig(name=options.name, backend="onnxruntime",
                            max_batch_size=options.max_batch_size,
                            default_model_filename=MODEL_FILE)
    for value in graph.input:
        if value.name in initializers:
            continue
        name, data_type, dims = _tensor_config(value, "input")
        config.input.append(mc.ModelInput(name=name, data_type=data_type, dims=dims))
    for value in graph.output:
        name, data_type, dims = _tensor_config(value, "output")
        config.output.append(mc.ModelOutput(name=name, data_type=data_type, dims=dims))
    config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    config.instance_group.append(mc.ModelInstanceGroup(
        count=options.instance_count, kind=mc.ModelInstanceGroup.Kind.Value(
            options.instance_kind)))
    return config


def write_triton_repository(onnx_path: Path, repository: Path,
                            options: TritonModelOptions) -> Path:
    """Write `repository/<name>/config.pbtxt` and `<name>/1/model.onnx` (a copy of the
    graph); returns the model's directory."""
    config = model_config(onnx_path, options)
    model_dir = repository / options.name
    (model_dir / MODEL_VERSION).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, model_dir / MODEL_VERSION / MODEL_FILE)
    (model_dir / CONFIG_FILE).write_text(text_format.MessageToString(config))
    return model_dir
