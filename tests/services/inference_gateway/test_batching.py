"""Continuous batching (in its engine process) computes what each request would get alone."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from services.inference_gateway.engines.base import SamplingParams
from services.inference_gateway.engines.process import EngineProcess
from services.inference_gateway.engines.sampling import request_rng, sample_rows
from services.inference_gateway.engines.torch import TorchEngine
from services.inference_gateway.errors import EngineUnavailable

PROMPTS = ["The", "A fortune for the weary traveller:", "Life is short, and",
           "Computers are", "In the beginning there was", "Q: Why? A:"]


@pytest.fixture(scope="module")
def engines(trained_model):
    base = TorchEngine(trained_model.path, version="v1")
    batching = EngineProcess(trained_model.path, version="v1", max_batch=4)
    yield base, batching
    batching.close()


def _alone(base, prompt, params):
    ids = base.encode_prompt(prompt)
    pieces = list(base.stream(ids, params))
    return "".join(p.text for p in pieces), pieces[-1]


async def _together(batching, jobs, *, stagger_s=0.0):
    async def one(prompt, params, delay):
        await asyncio.sleep(delay)
        ids = batching.encode_prompt(prompt)
        pieces = [p async for p in batching.astream(ids, params, threading.Event())]
        return "".join(p.text for p in pieces), pieces[-1]

    return await asyncio.gather(*(one(p, s, i * stagger_s) for i, (p, s) in enumerate(jobs)))


def test_batched_greedy_and_seeded_sampling_match_one_at_a_time(engines):
    base, batching = engines
    jobs = [(p, SamplingParams(max_new_tokens=6 + 5 * i)) for i, p in enumerate(PROMPTS)]
    jobs += [(p, SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=11 + i))
             for i, p in enumerate(PROMPTS[:3])]
    expected = [_alone(base, p, s) for p, s in jobs]
    # More requests than max_batch, arriving while others decode: they join and leave.
    got = asyncio.run(_together(batching, jobs, stagger_s=0.01))
    for (text, last), (want_text, want_last) in zip(got, expected, strict=True):
        assert text == want_text
        assert (last.finish_reason, last.completion_tokens) == (
            want_last.finish_reason, want_last.completion_tokens)


def test_a_cancelled_request_leaves_the_batch_and_others_finish(engines):
    _base, batching = engines

    async def scenario():
        cancelled = threading.Event()
        ids = batching.encode_prompt("The")
        stream = batching.astream(ids, SamplingParams(max_new_tokens=60), cancelled)
        await anext(stream)
        cancelled.set()
        await stream.aclose()
        return await _together(batching, [("Life is", SamplingParams(max_new_tokens=5))])

    ((_text, last),) = asyncio.run(scenario())
    assert last.finish_reason in ("length", "eos")


def test_a_new_version_swaps_in_without_failing_requests_in_flight(trained_model):
    from services.inference_gateway.frontend import GenerationFrontend, GenerationRequest, Limits
    from services.inference_gateway.registry import ModelRegistry

    old = EngineProcess(trained_model.path, version="v1", max_batch=4)
    new = EngineProcess(trained_model.path, version="v2", max_batch=4)
    registry = ModelRegistry(keep=1)  # the old version leaves as soon as v2 is in
    registry.install("m", old)
    frontend = GenerationFrontend(registry, Limits(max_new_tokens=64, max_concurrency=8,
                                                   max_queue=8, max_prompt_chars=1000))

    async def scenario():
        running = frontend.stream(GenerationRequest(model="m", prompt="The", max_new_tokens=40),
                                  threading.Event())
        first = await anext(running)
        registry.install("m", new)  # mid-stream
        rest = [p async for p in running]
        after = [p async for p in frontend.stream(
            GenerationRequest(model="m", prompt="The", max_new_tokens=3), threading.Event())]
        return first, rest, after

    first, rest, after = asyncio.run(scenario())
    assert (rest or [first])[-1].finish_reason in ("length", "eos")
    assert registry.version("m") == "v2" and after[-1].finish_reason
    # The engine's reader thread reaps the child too (EngineProcess._child_gone): a join
    # here can lose that race to waitpid and see no exit code yet, so wait for the code.
    deadline = time.monotonic() + 10
    while old.process.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert old.process.exitcode == 0  # retired once its request finished
    new.close()


def test_top_k_1_is_greedy_and_top_k_limits_the_choices():
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0, 3.0]])
    draws = {sample_rows(logits, [SamplingParams(max_new_tokens=1, temperature=5.0, top_k=2,
                                                 seed=s)],
                         [request_rng(s)])[0] for s in range(1, 200)}
    assert draws == {1, 2}
    greedy = sample_rows(logits, [SamplingParams(max_new_tokens=1, temperature=2.0, top_k=1)],
                         [request_rng(3)])
    assert greedy == [1]


def test_a_mixed_batch_samples_each_row_as_it_would_alone():
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 3
    params = [SamplingParams(1), SamplingParams(1, temperature=1.0, seed=5),
              SamplingParams(1, temperature=0.7, top_p=0.8, seed=6),
              SamplingParams(1, temperature=1.3, top_k=7, seed=7), SamplingParams(1),
              SamplingParams(1, temperature=1.0, top_p=0.5, top_k=20, seed=8)]
    for draw in range(20):
        together = sample_rows(logits, params, [request_rng(p.seed + draw) for p in params])
        alone = [sample_rows(logits[i:i + 1], [p], [request_rng(p.seed + draw)])[0]
                 for i, p in enumerate(params)]
        assert together == alone
        assert together[0] == int(logits[0].argmax())
        assert together[4] == int(logits[4].argmax())


def test_bf16_weights_serve_through_the_batching_engine(trained_model):
    engine = EngineProcess(trained_model.path, version="b", dtype="bf16", max_batch=4)
    try:
        ((_text, last),) = asyncio.run(_together(engine, [("The",
                                                           SamplingParams(max_new_tokens=6))]))
        assert last.finish_reason in ("length", "eos") and last.completion_tokens >= 1
    finally:
        engine.close()


def test_a_killed_engine_process_fails_its_requests_and_the_next_ones_are_served(engines):
    """kill -9 of the child mid-generation: the request in flight gets a clear error
    at once, a new child is started, and later requests are answered."""
    _base, batching = engines

    async def scenario():
        ids = batching.encode_prompt("The")
        stream = batching.astream(ids, SamplingParams(max_new_tokens=60), threading.Event())
        await anext(stream)
        batching.process.kill()
        with pytest.raises(EngineUnavailable, match="exited"):
            async for _ in stream:
                pass

    asyncio.run(scenario())
    deadline = time.monotonic() + 120
    while batching.restarts == 0 or not batching.process.is_alive():
        assert time.monotonic() < deadline, "no new engine process"
        time.sleep(0.2)
    ((_text, last),) = asyncio.run(_together(batching, [("Life is",
                                                         SamplingParams(max_new_tokens=4))]))
    assert last.finish_reason in ("length", "eos")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_a_cuda_device_that_is_not_there_is_refused_before_serving(trained_model):
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        TorchEngine(trained_model.path, version="c", device="cuda")
    with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
        EngineProcess(trained_model.path, version="c", device="cuda:0", max_batch=2)


# Starts child processes (engine processes, the CLI, model exports): not in `make unit`.
pytestmark = pytest.mark.processes


def test_the_engine_process_reports_its_rss_and_kv_cache_rows_in_use(trained_model):
    from prometheus_client import REGISTRY

    def value(name: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"version": "kv"})

    engine = EngineProcess(trained_model.path, version="kv", max_batch=4)
    try:
        assert (value("lmforge_gateway_engine_rss_bytes") or 0) > 10e6  # torch + a model
        assert value("lmforge_gateway_kv_cache_rows_used") == 0

        async def two_running() -> tuple[float | None, float | None]:
            streams = [engine.astream(engine.encode_prompt(p), SamplingParams(
                max_new_tokens=200), threading.Event()) for p in ("The", "Life is")]
            for stream in streams:
                await anext(stream)  # both have their first piece: both hold a row
            seen = (value("lmforge_gateway_kv_cache_rows_used"),
                    value("lmforge_gateway_kv_cache_occupancy_ratio"))
            for stream in streams:
                await stream.aclose()
            return seen

        assert asyncio.run(two_running()) == (2, 0.5)
        assert value("lmforge_gateway_kv_cache_rows_used") == 0
    finally:
        engine.close()
    assert value("lmforge_gateway_engine_rss_bytes") is None  # a closed engine is no series
