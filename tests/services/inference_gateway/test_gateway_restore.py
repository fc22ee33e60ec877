"""A restarted gateway consumes at once and restores its deployed models behind it.

The deployments bucket says N models are deployed; the gateway starts on a real
nats-server (a restart, as far as it can tell). It must consume, and answer for
the models it has loaded, long before all N are loaded: a request for one still
loading is UNAVAILABLE / 503 "model_loading" with Retry-After, a new version
deployed meanwhile wins over the one the restore read, and in the end all N serve.
It used to load all N before consuming: the chaos run saw over 120 s with 15-18.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from tritonclient.grpc import service_pb2 as kserve_pb
from tritonclient.grpc import service_pb2_grpc as kserve_grpc

from lmforge.artifacts import ArtifactStore
from lmforge.bus import EventBus
from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.contracts.v1 import generate_pb2, generate_pb2_grpc
from services.inference_gateway.handlers import GatewayService
from tests.helpers import in_process_service, publish, wait_for_events
from tests.services.inference_gateway.gateway_replicas import (
    GatewayReplica,
    engine_processes,
    free_port,
    processes_with_home,
    store_export,
)

MODELS = [f"fortune-{i}" for i in range(6)]
LAST = MODELS[-1]  # restored last (the restore goes in name order)
GATEWAY = dict(gateway_port=0, gateway_http_port=0, gateway_threads=1, gateway_max_batch=4)
"""The default engine (continuous batching in a child process per model version): what
makes a restore take seconds per model."""


def _exported(model: str, run_id: str, version: str, export) -> ev.ModelExported:
    return ev.ModelExported(run_id=run_id, model_name=model, version=version,
                            export=ev.ArtifactRef(digest=export.digest,
                                                  size_bytes=export.size_bytes))


async def _generate(port: int, model: str) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        try:
            async for _ in stub.Generate(generate_pb2.GenerateRequest(
                    model=model, prompt="The", max_new_tokens=2), timeout=60):
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def _health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""))
    return answer.status


async def _model_ready(port: int, model: str) -> bool:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = await kserve_grpc.GRPCInferenceServiceStub(channel).ModelReady(
            kserve_pb.ModelReadyRequest(name=model))
    return answer.ready


def test_a_restart_consumes_before_its_models_are_restored(nats_server, tmp_path,
                                                          trained_model):
    home = tmp_path / "home"
    export = store_export(ArtifactStore(home / "artifacts"), trained_model.path)

    async def scenario():
        writer = EventBus("test-writer")
        await writer.connect(nats_server.url)
        bucket = writer.key_value(Bucket.DEPLOYMENTS)
        for i, model in enumerate(MODELS):
            await bucket.put(model, _exported(model, f"run-{i}", "v1",
                                              export).SerializeToString())
        await writer.close()

        started = time.monotonic()
        async with in_process_service(GatewayService, nats_server.url, home=str(home),
                                      **GATEWAY) as gateway:
            consuming_s = time.monotonic() - started
            print(f"restart with {len(MODELS)} deployed models: consuming after "
                  f"{consuming_s:.2f} s")
            loading = sorted(gateway.registry.pending())
            assert loading, "every model was loaded before the gateway consumed"
            found: dict[str, object] = {"loading_at_start": loading}
            port = gateway.server.port
            found["grpc_loading"] = await _generate(port, LAST)
            async with aiohttp.ClientSession() as session, session.post(
                    f"http://127.0.0.1:{gateway.http.port}/v1/completions",
                    json={"model": LAST, "prompt": "The"}) as response:
                found["http_loading"] = (response.status, response.headers.get("Retry-After"),
                                         (await response.json())["error"]["code"])
            found["health_while_restoring"] = await _health(port)

            # A new version of the model restored last, deployed while the restore runs.
            await publish(nats_server.url, _exported(LAST, "run-new", "v2", export),
                          "run-new:exported")
            await wait_for_events(nats_server.url, subjects.MODEL_DEPLOYED, 1,
                                  run_id="run-new", timeout=120)
            found["deployed_s"] = time.monotonic() - started
            found["loading_when_deployed"] = sorted(gateway.registry.pending())
            first = MODELS[0]
            deadline = time.monotonic() + 60
            while not await _model_ready(port, first):
                assert time.monotonic() < deadline, f"{first} never became ready"
                await asyncio.sleep(0.1)
            found["first_ready_s"] = time.monotonic() - started
            found["first_served"] = await _generate(port, first)

            deadline = time.monotonic() + 180
            while gateway.registry.pending() or gateway.restoring:
                assert time.monotonic() < deadline, gateway.registry.pending()
                await asyncio.sleep(0.2)
            found["restored_s"] = time.monotonic() - started
            await asyncio.sleep(1.0)  # a late load of the replaced version would show now
            found["served"] = {m: (await _generate(port, m))[0] for m in MODELS}
            found["last_versions"] = gateway.registry.versions(LAST)
            found["health_after"] = await _health(port)
        print("restore figures:", {k: v for k, v in found.items() if k.endswith("_s")})
        found["consuming_s"] = consuming_s
        return found

    found = asyncio.run(scenario())
    # The models not loaded yet say so.
    assert found["grpc_loading"][0] == grpc.StatusCode.UNAVAILABLE, found
    assert "deployed but not loaded" in found["grpc_loading"][1], found
    assert found["http_loading"] == (503, "2", "model_loading"), found
    assert found["health_while_restoring"] == health_pb2.HealthCheckResponse.NOT_SERVING
    # A deploy event consumed, and a restored model served, while others still load.
    assert found["loading_when_deployed"], found
    assert found["first_served"] == (grpc.StatusCode.OK, ""), found
    assert found["first_ready_s"] < found["restored_s"], found
    # In the end all serve; the newer version won, and the restore never loaded v1 of it.
    assert found["served"] == {m: grpc.StatusCode.OK for m in MODELS}, found
    assert found["last_versions"] == ["v2"], found
    assert found["health_after"] == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("restore_of_v1", ["loads", "fails"])
def test_a_restore_that_ends_after_a_newer_version_does_not_take_the_model_back(
        trained_model, restore_of_v1):
    """The restore's load of v1 is still running when a model.exported of v2 is handled
    and v2 is served: v1, loaded last, is closed instead of replacing v2; or, if its load
    fails, it is not expected and retried (it is not what is deployed any more)."""
    from services.inference_gateway.deployments import ModelLoader
    from services.inference_gateway.engines.torch import TorchEngine
    from services.inference_gateway.registry import ModelRegistry

    release_v1 = threading.Event()
    closed: list[str] = []

    class Recorded(TorchEngine):
        def close(self) -> None:
            closed.append(self.version)
            super().close()

    def build(event: ev.ModelExported) -> Recorded:
        if event.version == "v1":  # the restore's load, held until v2 is served
            assert release_v1.wait(60)
            if restore_of_v1 == "fails":
                raise FileNotFoundError("v1's export is not in the store")
        return Recorded(trained_model.path, version=event.version)

    async def scenario():
        registry = ModelRegistry()
        loader = ModelLoader(registry, build)
        old, new = (ev.ModelExported(run_id=f"run-{v}", model_name="m", version=v)
                    for v in ("v1", "v2"))
        loader.expect([old])  # start-up: the bucket says v1
        restore = asyncio.create_task(loader.catch_up([old], read_at=registry.installs))
        await asyncio.sleep(0.2)  # the restore is loading v1
        registry.expect("m", "v2")  # on_exported(v2)
        assert await loader.load(new) is True
        release_v1.set()
        await restore
        return registry.version("m"), registry.versions("m"), registry.pending()

    current, versions, pending = asyncio.run(scenario())
    assert (current, versions, pending) == ("v2", ["v2"], {})
    assert closed == (["v1"] if restore_of_v1 == "loads" else [])


def _deploy(nats_url: str, models: list[str], export) -> None:
    """Record `models` as deployed (v1), as a gateway that ran before would have."""
    async def put():
        writer = EventBus("test-writer")
        await writer.connect(nats_url)
        bucket = writer.key_value(Bucket.DEPLOYMENTS)
        for i, model in enumerate(models):
            await bucket.put(model, _exported(model, f"run-{i}", "v1",
                                              export).SerializeToString())
        await writer.close()

    asyncio.run(put())


def _spawned(pid: int) -> list[tuple[int, str]]:
    """The engine processes of `pid` (multiprocessing spawn children: not the test's
    nats-server, another child of pytest)."""
    return [(child, state) for child, state in engine_processes(pid)
            if b"spawn_main" in _cmdline(child)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


async def _engine_starting(pid: int, timeout: float = 120.0) -> None:
    """Until `pid` has an engine process: a load of the restore is in flight (the build
    waits for that child to load the model, seconds)."""
    deadline = time.monotonic() + timeout
    while not _spawned(pid):
        assert time.monotonic() < deadline, "no engine process was started"
        await asyncio.sleep(0.01)


def test_stopping_a_gateway_during_a_restore_closes_the_engine_being_built(
        nats_server, tmp_path, trained_model):
    """The gateway is stopped while its restore builds an engine (its child process is
    loading the model): once the gateway has stopped, no engine process of it is left,
    the one being built included. Cancelling the restore used to cancel only the waiter:
    the build carried on in its thread and its engine was closed by nobody."""
    home = tmp_path / "home"
    export = store_export(ArtifactStore(home / "artifacts"), trained_model.path)
    _deploy(nats_server.url, MODELS[:2], export)

    async def scenario():
        async with in_process_service(GatewayService, nats_server.url, home=str(home),
                                      **GATEWAY) as gateway:
            await _engine_starting(os.getpid())
            loading = sorted(gateway.registry.pending())
        return loading, _spawned(os.getpid())

    loading, left = asyncio.run(scenario())
    assert loading, "the restore was over before the gateway stopped"
    assert left == [], f"engine processes outlived the gateway's stop: {left}"


def test_a_gateway_process_stopped_during_a_restore_leaves_no_engine_process(
        nats_server, tmp_path, trained_model):
    """`python -m services.inference_gateway` gets SIGTERM while its restore builds an
    engine: it exits 0, says it waited for the load, and leaves no process behind. (The
    process did not leak it before either: engines/process.py closes the engines still
    open at interpreter exit; but it said "engines stopped" while one was being built.)"""
    home = tmp_path / "home"
    export = store_export(ArtifactStore(home / "artifacts"), trained_model.path)
    _deploy(nats_server.url, MODELS[:2], export)

    async def scenario():
        replica = GatewayReplica(0, home, nats_server.url, free_port(), free_port()).start()
        try:
            await replica.wait_ready()
            assert replica.process is not None
            await _engine_starting(replica.process.pid)
            replica.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(replica.process.wait, 120)
            return code, processes_with_home(home), replica.log()
        finally:
            replica.stop()

    code, survivors, log = asyncio.run(scenario())
    assert code == 0, log[-3000:]
    assert survivors == [], f"still running after the gateway stopped: {survivors}"
    assert "waiting for 1 model load(s)" in log, log[-3000:]
    # The build that was running is over before the gateway says its engines stopped.
    assert log.rindex("engines stopped") > log.rindex("is served at"), log[-3000:]


def test_each_replica_in_a_process_has_its_own_restoring_gauge(nats_server, tmp_path,
                                                                trained_model):
    """Replica 0 has restored when replica 1 starts restoring, in the same process:
    lmforge_gateway_restoring says 0 for the one and 1 for the other (one process-wide
    gauge said 1 for both, then 0 for both)."""
    home = tmp_path / "home"
    export = store_export(ArtifactStore(home / "artifacts"), trained_model.path)
    _deploy(nats_server.url, MODELS[:1], export)
    fast = dict(gateway_port=0, gateway_http=False, gateway_batching=False, gateway_threads=1)

    def restoring(replica: int) -> float | None:
        return REGISTRY.get_sample_value("lmforge_gateway_restoring",
                                         {"replica": str(replica)})

    async def scenario():
        async with in_process_service(GatewayService, nats_server.url, home=str(home),
                                      replica=0, **fast) as first:
            deadline = time.monotonic() + 120
            while first.restoring:
                assert time.monotonic() < deadline, "replica 0 never restored"
                await asyncio.sleep(0.05)
            async with in_process_service(GatewayService, nats_server.url, home=str(home),
                                          replica=1, **fast) as second:
                assert second.restoring
                during = restoring(0), restoring(1)
                while second.restoring:
                    assert time.monotonic() < deadline, "replica 1 never restored"
                    await asyncio.sleep(0.05)
                after = restoring(0), restoring(1)
        return during, after

    during, after = asyncio.run(scenario())
    assert during == (0.0, 1.0)
    assert after == (0.0, 0.0)


# Loads models into the gateway (transformers in-process): not in `make unit`.
pytestmark = pytest.mark.processes
