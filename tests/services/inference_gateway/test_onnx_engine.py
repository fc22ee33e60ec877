"""The onnxruntime backend generates what the PyTorch backend generates, and
build_engine serves the backend the settings name."""

from __future__ import annotations

import asyncio
import shutil
import threading

import onnx
import pytest

from lmforge.onnx_decoder import NotADecoderGraphError
from services.exporter.onnx_export import export_decoder_onnx
from services.inference_gateway.engines import build_engine
from services.inference_gateway.engines.base import Engine, SamplingParams
from services.inference_gateway.engines.onnx import OnnxEngine
from services.inference_gateway.engines.process import EngineProcess
from services.inference_gateway.engines.torch import TorchEngine
from services.inference_gateway.settings import GatewaySettings


@pytest.fixture(scope="module")
def export(tmp_path_factory, trained_model):
    """An exported directory as the exporter writes it: hf/ and onnx/model.onnx, the
    decoder graph with its KV cache."""
    from lmforge.modeling import load_causal_lm

    export = tmp_path_factory.mktemp("export")
    shutil.copytree(trained_model.path, export / "hf")
    model = load_causal_lm(trained_model.path)
    export_decoder_onnx(model, export / "onnx" / "model.onnx",
                        max_seq_len=model.config.max_position_embeddings)
    return export


def test_onnx_backend_matches_torch_greedy_and_seeded(export):
    torch_engine = TorchEngine(export / "hf", version="t")
    onnx_engine = OnnxEngine(export, version="o")
    for params in (SamplingParams(max_new_tokens=10),
                   SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=3)):
        ids = torch_engine.encode_prompt("A fortune:")
        want = list(torch_engine.stream(ids, params))
        got = list(onnx_engine.stream(onnx_engine.encode_prompt("A fortune:"), params))
        assert "".join(p.text for p in got) == "".join(p.text for p in want)
        assert got[-1].finish_reason == want[-1].finish_reason


def test_onnx_backend_feeds_one_token_per_step_through_the_cache(export):
    """The prompt runs once; each later step runs one token on a cache that grows by
    one (the logits-only graph re-ran the whole sequence: O(n) per step)."""
    engine = OnnxEngine(export, version="o")
    calls = []
    forward = engine.decoder.forward

    def recording_forward(input_ids, cache=None):
        calls.append((input_ids.shape, 0 if cache is None else cache.length))
        return forward(input_ids, cache)

    engine.decoder.forward = recording_forward  # type: ignore[method-assign]
    prompt = engine.encode_prompt("A fortune:")
    pieces = list(engine.stream(prompt, SamplingParams(max_new_tokens=12)))
    assert pieces[-1].finish_reason in ("length", "eos")
    steps = pieces[-1].completion_tokens + (pieces[-1].finish_reason == "eos")
    n = len(prompt.token_ids)
    assert calls[0] == ((1, n), 0)
    assert calls[1:] == [((1, 1), n + i) for i in range(steps - 1)]


def test_an_export_without_the_cache_graph_is_refused_at_load(export, tmp_path):
    """An export from before the KV cache is not served the slow way: it is refused,
    saying what to do."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "hf").symlink_to(export / "hf")
    ids = onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64,
                                             ["batch", "sequence"])
    logits = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.INT64,
                                                ["batch", "sequence"])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["input_ids"],
                                                          ["logits"])], "g", [ids], [logits])
    (old / "onnx").mkdir()
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]),
              str(old / "onnx" / "model.onnx"))
    with pytest.raises(NotADecoderGraphError, match="re-export"):
        OnnxEngine(old, version="old")


@pytest.mark.parametrize(("settings", "kind"), [
    (dict(gateway_backend="torch", gateway_batching=True, gateway_max_batch=4), EngineProcess),
    (dict(gateway_backend="torch", gateway_batching=False), TorchEngine),
    (dict(gateway_backend="onnx"), OnnxEngine),
], ids=["batching", "single", "onnx"])
def test_build_engine_serves_the_backend_the_settings_name(export, settings, kind):
    engine = build_engine(GatewaySettings(**settings), export, "v9")
    params = SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=5)

    async def generate(engine: Engine) -> str:
        prompt = engine.encode_prompt("A fortune:")
        return "".join([p.text async for p in engine.astream(prompt, params,
                                                             threading.Event())])

    try:
        assert isinstance(engine, kind) and engine.version == "v9"
        reference = TorchEngine(export / "hf", version="r")
        assert asyncio.run(generate(engine)) == asyncio.run(generate(reference))
    finally:
        if isinstance(engine, EngineProcess):
            engine.close()


# Starts child processes (engine processes, the CLI, model exports): not in `make unit`.
pytestmark = pytest.mark.processes
