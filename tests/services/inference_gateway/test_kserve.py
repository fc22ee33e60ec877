"""tritonclient, unchanged, against the gateway's KServe v2 protocol on 127.0.0.1."""

from __future__ import annotations

import asyncio
import queue

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from services.inference_gateway.engines.torch import TorchEngine
from services.inference_gateway.registry import ModelRegistry
from tests.helpers import start_gateway


@pytest.fixture(scope="module")
def engine(trained_model):
    return TorchEngine(trained_model.path, version="v7")


def _inputs(prompt=b"A fortune", *, max_tokens=8, seed=5, temperature=0.9):
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt], dtype=np.object_))
    tokens = triton.InferInput("max_tokens", [1], "INT32")
    tokens.set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
    temp = triton.InferInput("temperature", [1], "FP32")
    temp.set_data_from_numpy(np.array([temperature], dtype=np.float32))
    seed_in = triton.InferInput("seed", [1], "UINT64")
    seed_in.set_data_from_numpy(np.array([seed], dtype=np.uint64))
    return [text, tokens, temp, seed_in]


def _with_gateway(engine, client_work):
    """Run the gateway in this loop and the (blocking) tritonclient in a thread."""

    async def scenario():
        registry = ModelRegistry()
        registry.install("fortune", engine)
        server = await start_gateway(registry, serving=True)
        try:
            client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
            return await asyncio.to_thread(client_work, client)
        finally:
            await server.stop()

    return asyncio.run(scenario())


def test_health_metadata_config_and_index(engine):
    def work(client):
        return (client.is_server_live(), client.is_server_ready(),
                client.is_model_ready("fortune"), client.is_model_ready("fortune", "v7"),
                client.is_model_ready("fortune", "v1"), client.is_model_ready("ghost"),
                client.get_server_metadata(as_json=True),
                client.get_model_metadata("fortune", as_json=True),
                client.get_model_config("fortune", as_json=True),
                client.get_model_repository_index(as_json=True))

    live, ready, m_ready, v_ready, old, ghost, server, meta, config, index = _with_gateway(
        engine, work)
    assert live and ready and m_ready and v_ready and not old and not ghost
    assert server["name"] == "lmforge"
    assert meta["versions"] == ["v7"]
    assert {i["name"]: i["datatype"] for i in meta["inputs"]}["text_input"] == "BYTES"
    assert meta["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": ["1"]}]
    assert config["config"]["model_transaction_policy"]["decoupled"] is True
    assert index["models"] == [{"name": "fortune", "version": "v7", "state": "READY"}]


def test_infer_and_decoupled_stream_give_the_same_seeded_text(engine):
    def work(client):
        unary = client.infer("fortune", _inputs(),
                             outputs=[triton.InferRequestedOutput("text_output")])
        text = unary.as_numpy("text_output")[0].decode()
        responses: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer("fortune", _inputs(), request_id="s1")
        pieces, final = [], False
        while not final:
            result, error = responses.get(timeout=30)
            assert error is None, error
            pieces.append(result.as_numpy("text_output")[0].decode())
            params = result.get_response().parameters
            final = params["triton_final_response"].bool_param
            assert result.get_response().id == "s1"
        client.stop_stream()
        return text, pieces

    text, pieces = _with_gateway(engine, work)
    assert text and "".join(pieces) == text
    assert len(pieces) >= 2


@pytest.mark.parametrize(("make", "code", "message"), [
    (lambda: [_named("prompt", "BYTES", [b"x"])], "INVALID_ARGUMENT", "unknown input 'prompt'"),
    (lambda: [_named("text_input", "INT32", np.array([3], dtype=np.int32))], "INVALID_ARGUMENT",
     "has datatype INT32; expected BYTES"),
    (lambda: [_named("text_input", "BYTES", [b"a", b"b"])], "INVALID_ARGUMENT",
     "has shape [2]"),
    (lambda: _inputs(max_tokens=0), "INVALID_ARGUMENT", "max_tokens 0 must be positive"),
    (lambda: _inputs(max_tokens=100_000), "INVALID_ARGUMENT", "max_new_tokens 100000"),
    (lambda: _inputs(prompt=b"\xff\xfe bad"), "INVALID_ARGUMENT", "not valid UTF-8"),
    (lambda: _inputs(prompt=b""), "INVALID_ARGUMENT", "prompt is empty"),
])
def test_bad_tensors_get_invalid_argument_with_the_reason(engine, make, code, message):
    def work(client):
        with pytest.raises(InferenceServerException) as raised:
            client.infer("fortune", make())
        ok = client.infer("fortune", _inputs(max_tokens=2))  # still serving
        return raised.value, ok

    error, ok = _with_gateway(engine, work)
    assert code in str(error.status()) and message in error.message()
    assert ok.as_numpy("text_output") is not None


def test_unknown_model_is_not_found(engine):
    def work(client):
        with pytest.raises(InferenceServerException) as raised:
            client.infer("ghost", _inputs())
        return raised.value

    error = _with_gateway(engine, work)
    assert "NOT_FOUND" in str(error.status()) and "not served here" in error.message()


def _named(name, datatype, values):
    tensor = triton.InferInput(name, [len(values)], datatype)
    array = np.array(values, dtype=np.object_) if datatype == "BYTES" else values
    tensor.set_data_from_numpy(array)
    return tensor


def test_versions_are_served_by_name_and_the_oldest_is_retired(engine, trained_model):
    older = TorchEngine(trained_model.path, version="v6")
    newer = TorchEngine(trained_model.path, version="v8")

    def work(client):
        seen = {}
        for version in ("v6", "v7", ""):
            result = client.infer("fortune", _inputs(max_tokens=3), model_version=version)
            seen[version] = result.get_response().model_version
        ready = client.is_model_ready("fortune", "v6")
        return seen, ready

    async def scenario():
        registry = ModelRegistry(keep=2)
        registry.install("fortune", older)
        registry.install("fortune", engine)  # v7 current, v6 kept
        server = await start_gateway(registry)
        try:
            client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
            seen, ready = await asyncio.to_thread(work, client)
            registry.install("fortune", newer)  # v6 is pushed out
            with pytest.raises(InferenceServerException) as gone:
                await asyncio.to_thread(client.infer, "fortune", _inputs(max_tokens=2),
                                        model_version="v6")
            return seen, ready, gone.value, registry.versions("fortune")
        finally:
            await server.stop()

    seen, ready, gone, loaded = asyncio.run(scenario())
    assert seen == {"v6": "v6", "v7": "v7", "": "v7"} and ready
    assert "NOT_FOUND" in str(gone.status()) and "no version 'v6'" in gone.message()
    assert loaded == ["v8", "v7"]
