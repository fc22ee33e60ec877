"""The engines that turn a prompt into pieces of text, behind one `Engine` protocol (base.py).

- process.py: continuous batching in an engine process (batching.py is its loop,
  slot_decoder.py its KV cache): the torch backend with batching on, the default;
- torch.py: one request at a time on in-process PyTorch
  (LMFORGE_GATEWAY_BATCHING=false);
- onnx.py: onnxruntime on the exporter's decoder graph and its KV cache
  (LMFORGE_GATEWAY_BACKEND=onnx);
- remote_triton.py: a model of a remote Triton / KServe v2 server
  (LMFORGE_GATEWAY_REMOTE_MODELS), its request tensors in the remote model's
  convention (llm_conventions.py).

All local engines sample with sampling.py and turn tokens into text with
decoding.py. `build_engine` is the one place that chooses among the local ones;
a remote engine is built from its own `RemoteTritonConfig`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.modeling import is_awq_model
from services.inference_gateway.engines.base import Engine
from services.inference_gateway.engines.int4_report import Int4Report
from services.inference_gateway.engines.onnx import OnnxEngine
from services.inference_gateway.engines.process import EngineProcess
from services.inference_gateway.engines.remote_triton import RemoteTritonConfig, RemoteTritonEngine
from services.inference_gateway.engines.torch import TorchEngine

if TYPE_CHECKING:  # settings.py imports the engines' own configs from here
    from services.inference_gateway.settings import GatewaySettings

__all__ = ["Engine", "RemoteTritonConfig", "RemoteTritonEngine", "build_engine",
           "exported_task_eval", "import_engine_modules", "served_precision"]


def import_engine_modules(settings: GatewaySettings) -> None:
    """Import, once and on the calling thread, what `build_engine` would import lazily.

    transformers resolves its classes on first use, and that lazy import is not safe in
    two threads at once: a restore and a model.exported loading together failed with
    "cannot import name 'PreTrainedTokenizerFast' from 'transformers'". The gateway calls
    this before it starts any thread.
    """
    import transformers

    names = ["PreTrainedTokenizerFast"]  # every local engine tokenizes in the gateway
    if settings.gateway_backend == "torch" and not settings.gateway_batching:
        # The single-request engine loads the model in the gateway: AutoModelForCausalLM
        # and the model classes it resolves from the config (the batching engine loads
        # it in its own process).
        names += ["AutoModelForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM"]
    for name in names:
        getattr(transformers, name)
    if settings.gateway_backend == "onnx":
        import onnxruntime  # noqa: F401


def build_engine(settings: GatewaySettings, export_dir: Path, version: str) -> Engine:
    """The engine that serves the exported model in `export_dir` (its hf/ and onnx/
    directories) as `version`, as the settings ask. Loads the model: call it off the
    event loop."""
    if settings.gateway_backend == "onnx":
        return OnnxEngine(export_dir, version=version, threads=settings.engine_threads)
    if settings.gateway_batching:
        return EngineProcess(export_dir / "hf", version=version, dtype=settings.gateway_dtype,
                             device=settings.gateway_device, max_batch=settings.gateway_max_batch,
                             threads=settings.engine_threads)
    return TorchEngine(export_dir / "hf", version=version, dtype=settings.gateway_dtype,
                       device=settings.gateway_device)



def served_precision(settings: GatewaySettings, export_dir: Path,
                     int4_report: Int4Report | None = None) -> tuple[str, str]:
    """(precision, why it is not quite the exported one) of what the engine built from
    `export_dir` serves: for a packed int4 model on the torch engines, what its load
    reported (`int4_report`: every layer int4, some served dequantised and why, or all
    of them, as on a GPU the kernel does not run on); the onnxruntime backend's fp32
    graph; the exporter's own precision and reason otherwise."""
    export = json.loads((export_dir / "export.json").read_text())
    exported = export.get("served_weights", "fp32")
    reason = export.get("served_reason", "")
    if not is_awq_model(export_dir / "hf"):
        return (settings.gateway_dtype if settings.gateway_backend == "torch" else "fp32",
                reason)
    if settings.gateway_backend == "onnx":
        return "fp32", (f"the onnxruntime backend runs the fp32 graph of the {exported} "
                        "weights (LMFORGE_GATEWAY_BACKEND=onnx)")
    if int4_report is None or not int4_report.dequantised:
        return exported, ""
    dtype = settings.gateway_dtype
    if len(int4_report.dequantised) == int4_report.layers:
        why = "; ".join(sorted(set(int4_report.dequantised.values())))
        return dtype, f"{exported} weights dequantised to {dtype} at load: {why}"
    return exported, int4_report.describe(dtype)


def exported_task_eval(export_dir: Path) -> dict[str, Any]:
    """The eval set's figures the exporter wrote beside the weights in `export_dir`
    (task_eval.served_figures: per set of weights scored, and which one is served);
    {} for a run without an eval set or an export from before the figures."""
    path = export_dir / "export.json"
    figures = json.loads(path.read_text()).get("task_eval") or {}
    if not isinstance(figures, dict):
        raise ValueError(f"{path}: 'task_eval' is {type(figures).__name__}, not an object; "
                         "re-export the run")
    return figures
