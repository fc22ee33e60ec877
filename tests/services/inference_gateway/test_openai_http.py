"""The OpenAI SDK, unchanged, against the gateway's HTTP endpoint on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import openai
import pytest

from services.inference_gateway.api.openai import OpenAIServer
from services.inference_gateway.engines.process import EngineProcess
from services.inference_gateway.frontend import GenerationFrontend, Limits
from services.inference_gateway.registry import ModelRegistry


@pytest.fixture(scope="module")
def engine(trained_model):
    engine = EngineProcess(trained_model.path, version="v3", max_batch=8)
    yield engine
    engine.close()


def _with_http(engine, work):
    async def scenario():
        registry = ModelRegistry()
        registry.install("fortune", engine)
        frontend = GenerationFrontend(registry, Limits(max_new_tokens=64, max_concurrency=8,
                                                       max_queue=8, max_prompt_chars=2000))
        server = OpenAIServer(frontend, host="127.0.0.1", port=0, max_body_bytes=1 << 20)
        port = await server.start()
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                                   max_retries=0)
            return await asyncio.to_thread(work, client, port)
        finally:
            await server.stop()

    return asyncio.run(scenario())


def test_models_completions_and_streams(engine):
    def work(client, port):
        models = [m.id for m in client.models.list()]
        whole = client.completions.create(model="fortune", prompt="A fortune:", max_tokens=12,
                                          temperature=0.8, seed=4)
        chunks = list(client.completions.create(model="fortune", prompt="A fortune:",
                                                max_tokens=12, temperature=0.8, seed=4,
                                                stream=True))
        chat = client.chat.completions.create(
            model="fortune", messages=[{"role": "user", "content": "Tell me a fortune"}],
            max_tokens=10, temperature=0, seed=1)
        chat_chunks = list(client.chat.completions.create(
            model="fortune", messages=[{"role": "user", "content": "Tell me a fortune"}],
            max_tokens=10, temperature=0, stream=True))
        return models, whole, chunks, chat, chat_chunks

    models, whole, chunks, chat, chat_chunks = _with_http(engine, work)
    assert models == ["fortune"]
    assert whole.choices[0].finish_reason in ("length", "stop")
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 0
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    streamed = "".join(c.choices[0].delta.content or "" for c in chat_chunks)
    assert streamed == chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant"


def test_stop_strings_cut_the_text_before_the_match(engine):
    def work(client, port):
        free = client.completions.create(model="fortune", prompt="The", max_tokens=30,
                                         temperature=0)
        text = free.choices[0].text
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        cut = client.completions.create(model="fortune", prompt="The", max_tokens=30,
                                        temperature=0, stop=[stop])
        return text, stop, cut

    text, stop, cut = _with_http(engine, work)
    if len(stop) < 3 or not stop.strip():
        pytest.skip(f"greedy text too short to carve a stop string from: {text!r}")
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_errors_are_openai_shaped_with_the_right_status(engine):
    def work(client, port):
        errors = {}
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model="ghost", prompt="x")
        errors["404"] = e.value
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="fortune", prompt="x", max_tokens=0)
        errors["400"] = e.value
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="fortune", messages=[{"role": "wizard",
                                                                       "content": "x"}])
        errors["chat"] = e.value
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps({"model": "fortune", "prompt": "y" * (100 << 20)}).encode(),  # 100 MB
            headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=30)
        errors["413"] = e.value.code
        ok = client.completions.create(model="fortune", prompt="still", max_tokens=2)
        return errors, ok

    errors, ok = _with_http(engine, work)
    assert "not served here" in errors["404"].message
    assert "max_tokens 0 must be positive" in errors["400"].message
    assert "role system|user|assistant" in errors["chat"].message
    assert errors["413"] == 413
    assert ok.choices[0].finish_reason


# Starts child processes (engine processes, the CLI, model exports): not in `make unit`.
pytestmark = pytest.mark.processes
