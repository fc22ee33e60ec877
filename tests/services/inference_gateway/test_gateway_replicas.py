"""Replicas of the gateway on a real nats-server: scale-ups, kill -9, restarts, shutdown.

The fault test runs replicas as processes, as the supervisor does, sharing the
gRPC and HTTP ports, under a loop of requests that each open a new connection.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys
import textwrap
import time

import aiohttp
import aiohttp.web
import grpc
import nats
import pytest
from prometheus_client import REGISTRY
from tritonclient.grpc import service_pb2 as kserve_pb
from tritonclient.grpc import service_pb2_grpc as kserve_grpc

from lmforge.artifacts import ArtifactStore
from lmforge.bus import EventBus
from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket, ServiceName, durable_name
from lmforge.contracts.v1 import generate_pb2, generate_pb2_grpc
from lmforge.security.tls_certs import ensure_server_tls
from services.inference_gateway.api.server import GatewayServer, PortHolder, who_listens
from services.inference_gateway.frontend import GenerationFrontend, Limits
from services.inference_gateway.handlers import GatewayService
from services.inference_gateway.registry import ModelRegistry
from tests.helpers import in_process_service, publish, wait_for_events
from tests.services.inference_gateway.gateway_replicas import (
    MODEL,
    GatewayReplica,
    engine_processes,
    exported,
    free_port,
    left_running,
    processes_with_home,
    scale_up_and_kill,
    store_export,
)

IN_PROCESS = dict(gateway_port=0, gateway_http=False, gateway_batching=False,
                  gateway_threads=1)


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def export(home, trained_model):
    return store_export(ArtifactStore(home / "artifacts"), trained_model.path)


async def _generate(port: int) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        try:
            async for _ in stub.Generate(generate_pb2.GenerateRequest(
                    model=MODEL, prompt="The", max_new_tokens=2), timeout=30):
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_replicas_joining_or_restarting_under_load_never_answer_not_found(
        nats_server, home, export):
    """A scale-up to 2 and a kill -9 + restart under a request loop: no NOT_FOUND, no 404.
    A replica binds the shared ports only once it has loaded the deployed model; the only
    errors allowed are those of the killed replica's own connections."""
    figures = asyncio.run(scale_up_and_kill(home, nats_server.url, export))
    print("gateway replica faults:", figures)
    total = figures["total"]
    assert isinstance(total, dict)
    assert not {"NOT_FOUND", "http 404"} & set(total), figures
    assert set(total) <= {"OK", "http 200", "UNAVAILABLE", "http disconnected"}, figures
    scale_up = figures["scale_up"]
    assert isinstance(scale_up, dict)
    assert set(scale_up) <= {"OK", "http 200"}, figures
    assert total["OK"] > 20 and total["http 200"] > 5, figures
    assert figures["ok_served_by_new_replica"] > 0, figures
    assert figures["ok_served_by_restarted_replica"] > 0, figures
    assert left_running(home) == [], "engine processes outlived their gateway"


def test_a_replica_added_later_does_not_announce_old_runs_again(nats_server, home, export):
    """Runs a (v1) then b (v2) are deployed by replica 0; replica 1, added later, replays
    both exports on its own durable: it serves v2 (never v1), and publishes no
    model.deployed."""
    async def scenario():
        nc = await nats.connect(nats_server.url)
        announced = []  # every publish, also those JetStream drops as duplicates

        async def heard(msg):
            announced.append(msg.headers or {})

        await nc.subscribe(subjects.MODEL_DEPLOYED.name, cb=heard)
        async with in_process_service(GatewayService, nats_server.url, home=str(home),
                                      replica=0, **IN_PROCESS):
            for run, version in (("run-a", "v1"), ("run-b", "v2")):
                await publish(nats_server.url, exported(run, version, export), f"{run}:exp")
                await wait_for_events(nats_server.url, subjects.MODEL_DEPLOYED, 1,
                                      run_id=run, timeout=120)
            await nc.flush()
            by_first = len(announced)
            async with in_process_service(GatewayService, nats_server.url, home=str(home),
                                          replica=1, **IN_PROCESS) as later:
                deadline = time.monotonic() + 60  # restored in the background
                while (served_first := later.registry.version(MODEL)) is None:
                    assert time.monotonic() < deadline, "the model was never restored"
                    await asyncio.sleep(0.05)
                durable = durable_name(ServiceName.INFERENCE_GATEWAY, subjects.MODEL_EXPORTED,
                                       replica=1)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:  # until both exports are handled
                    info = await later.bus.js.consumer_info(subjects.STREAM, durable)
                    if info.num_pending == 0 and info.num_ack_pending == 0:
                        break
                    await asyncio.sleep(0.2)
                await asyncio.sleep(1.0)
                served_after = later.registry.version(MODEL)
                code, _ = await _generate(later.server.port)
        await nc.flush()
        await nc.close()
        return by_first, len(announced), served_first, served_after, code

    by_first, in_all, served_first, served_after, code = asyncio.run(scenario())
    assert by_first == 2
    assert in_all == 2, f"replica 1 announced {in_all - 2} old deployment(s) again"
    assert served_first == "v2" and served_after == "v2"
    assert code == grpc.StatusCode.OK


def test_a_deployed_model_that_fails_to_load_is_unavailable_retried_and_counted(
        nats_server, tmp_path, trained_model, caplog):
    """The bucket says the model is deployed, but its artifact is not in this replica's
    store yet: the replica answers UNAVAILABLE (never NOT_FOUND), shows why, counts and
    logs the failures, and serves the model once a retry finds the artifact."""
    home = tmp_path / "home"
    elsewhere = store_export(ArtifactStore(tmp_path / "elsewhere"), trained_model.path)
    event = exported("run-a", "v1", elsewhere)
    caplog.set_level(logging.WARNING, logger="lmforge.gateway")

    def failures() -> float:
        return REGISTRY.get_sample_value("lmforge_gateway_model_load_failures_total",
                                         {"model": MODEL}) or 0.0

    async def scenario():
        writer = EventBus("test-writer")
        await writer.connect(nats_server.url)
        await writer.key_value(Bucket.DEPLOYMENTS).put(MODEL, event.SerializeToString())
        await writer.close()
        before = failures()
        async with in_process_service(GatewayService, nats_server.url, home=str(home),
                                      **{**IN_PROCESS, "gateway_http": True,
                                         "gateway_http_port": 0}) as gateway:
            port = gateway.server.port
            deadline = time.monotonic() + 30  # tried once by the restore, then retried
            while failures() - before < 3:    # in the background 1 s and 2 s later
                assert time.monotonic() < deadline, "no third attempt to load the model"
                await asyncio.sleep(0.05)
            while_missing = await _generate(port)
            async with aiohttp.ClientSession() as session, session.post(
                    f"http://127.0.0.1:{gateway.http.port}/v1/completions",
                    json={"model": MODEL, "prompt": "The"}) as response:
                http_missing = (response.status, response.headers.get("Retry-After"),
                                (await response.json())["error"]["code"])
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                index = await kserve_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
                    kserve_pb.RepositoryIndexRequest())
            pending_gauge = REGISTRY.get_sample_value("lmforge_gateway_models_pending")
            failed = failures() - before
            store_export(ArtifactStore(home / "artifacts"), trained_model.path)
            deadline = time.monotonic() + 60
            while gateway.registry.version(MODEL) is None:
                assert time.monotonic() < deadline, "the model was never loaded"
                await asyncio.sleep(0.2)
            served = await _generate(port)
        return while_missing, http_missing, index, pending_gauge, failed, served

    while_missing, http_missing, index, pending_gauge, failed, served = asyncio.run(scenario())
    assert while_missing[0] == grpc.StatusCode.UNAVAILABLE, while_missing
    assert "deployed but not loaded" in while_missing[1]
    assert http_missing == (503, "2", "model_loading")
    (entry,) = index.models
    assert (entry.name, entry.version, entry.state) == (MODEL, "v1", "UNAVAILABLE")
    assert "failed to load 3 time(s)" in entry.reason and "not in the store" in entry.reason
    assert pending_gauge == 1
    assert failed >= 3
    assert served == (grpc.StatusCode.OK, "")
    warnings = [r.getMessage() for r in caplog.records if "could not load model" in
                r.getMessage()]
    assert warnings and "retrying in" in warnings[0]


def test_engine_imports_are_done_before_any_thread_starts(tmp_path):
    """Building the service imports what loading a model resolves lazily, so a restore
    and a model.exported loading at once cannot race inside transformers' lazy import."""
    script = textwrap.dedent("""
        import sys
        from lmforge.testing import InMemoryBroker
        from services.inference_gateway.handlers import GatewayService
        settings = GatewayService.Settings(nats_url="nats://unused:1", home=sys.argv[1],
                                           gateway_port=0, gateway_http=False)
        GatewayService(settings, InMemoryBroker().bus("inference-gateway"))
        before = set(sys.modules)
        import transformers
        transformers.PreTrainedTokenizerFast
        print(sorted(m for m in set(sys.modules) - before if m.startswith("transformers")))
    """)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


def test_shutdown_stops_every_engine_process_and_restarts_none(nats_server, home, export):
    """A gateway process with the batching engine (a child process per model version):
    a version pushed out by newer ones leaves no zombie, and SIGTERM stops the gateway and
    every engine process, starting none."""
    async def scenario():
        replica = GatewayReplica(0, home, nats_server.url, free_port(), free_port()).start()
        try:
            await replica.wait_ready()
            await publish(nats_server.url, exported("run-a", "v1", export), "run-a:exp")
            await wait_for_events(nats_server.url, subjects.MODEL_DEPLOYED, 1, run_id="run-a",
                                  timeout=120)
            assert replica.process is not None
            (first_engine, _), = engine_processes(replica.process.pid)
            for run, version in (("run-b", "v2"), ("run-c", "v3")):  # two versions are kept
                await publish(nats_server.url, exported(run, version, export), f"{run}:exp")
                await wait_for_events(nats_server.url, subjects.MODEL_DEPLOYED, 1, run_id=run,
                                      timeout=120)
            deadline = time.monotonic() + 30  # the retired engine finishes, exits, is reaped
            while first_engine in dict(engine_processes(replica.process.pid)):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            left = engine_processes(replica.process.pid)
            replica.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(replica.process.wait, 60)
            await asyncio.sleep(2.0)  # anything restarted during shutdown would show by now
            return left, code, processes_with_home(home), replica.log()
        finally:
            replica.stop()

    left, code, survivors, log = asyncio.run(scenario())
    assert len(left) == 2 and all(state != "Z" for _, state in left), left
    assert code == 0, log[-3000:]
    assert survivors == [], f"still running after the gateway stopped: {survivors}"
    assert "restarting" not in log, log[-3000:]


def test_a_port_taken_by_something_else_fails_start_up_at_once(nats_server, home, export,
                                                               caplog):
    """A listener on the gateway's port that is not a replica (here a bare TCP socket):
    with a model deployed, start-up used to take it for a replica, consume and restore
    (minutes with many models), and only then fail to bind. It fails at once, saying so."""
    caplog.set_level(logging.ERROR, logger="lmforge.gateway")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]

    async def scenario() -> float:
        writer = EventBus("test-writer")
        await writer.connect(nats_server.url)
        await writer.key_value(Bucket.DEPLOYMENTS).put(
            MODEL, exported("run-a", "v1", export).SerializeToString())
        await writer.close()
        settings = GatewayService.Settings(nats_url=nats_server.url, home=str(home),
                                           **{**IN_PROCESS, "gateway_port": port})
        bus = EventBus(GatewayService.name)
        await bus.connect(nats_server.url)
        started = time.monotonic()
        try:
            with pytest.raises(SystemExit):
                await GatewayService(settings, bus).start()
            return time.monotonic() - started
        finally:
            await bus.close()

    try:
        failed_after_s = asyncio.run(scenario())
    finally:
        taken.close()
    said = [r.getMessage() for r in caplog.records]
    assert any(f"port {port} (127.0.0.1) is taken by something that is not an lmforge "
               "gateway" in m for m in said), said
    assert failed_after_s < 10, failed_after_s


def _frontend() -> GenerationFrontend:
    return GenerationFrontend(ModelRegistry(), Limits(max_new_tokens=4, max_concurrency=1,
                                                      max_queue=1, max_prompt_chars=100))


def test_only_a_gateway_listening_on_the_port_counts_as_a_replica(tmp_path):
    """Plaintext: a replica answers gRPC health for the Generator service; an HTTP server
    does not. TLS: a replica presents this gateway's own certificate; a TLS server with
    another one (even from the same CA) is not a replica."""
    ours = ensure_server_tls(tmp_path / "tls", ["127.0.0.1"], stem="gateway")
    theirs = ensure_server_tls(tmp_path / "tls", ["127.0.0.1"], stem="other")

    async def serve_tls(tls) -> GatewayServer:
        server = GatewayServer(_frontend(), host="127.0.0.1", port=0, max_message_bytes=1024,
                               credentials=grpc.ssl_server_credentials(
                                   [(tls.key.read_bytes(), tls.cert.read_bytes())]))
        await server.start()
        return server

    async def scenario() -> dict[str, PortHolder]:
        found = {}
        replica = GatewayServer(_frontend(), host="127.0.0.1", port=0, max_message_bytes=1024)
        await replica.start()
        found["plaintext replica"] = (await who_listens("127.0.0.1", replica.port)).holder
        await replica.stop(0)
        found["nothing"] = (await who_listens("127.0.0.1", replica.port)).holder
        app = aiohttp.web.Application()
        runner = aiohttp.web.AppRunner(app)
        await runner.setup()
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        http_port = runner.addresses[0][1]
        found["http server"] = (await who_listens("127.0.0.1", http_port)).holder
        await runner.cleanup()
        for name, tls in (("tls replica", ours), ("tls stranger", theirs)):
            server = await serve_tls(tls)
            found[name] = (await who_listens("127.0.0.1", server.port, tls_cert=ours.cert,
                                             tls_key=ours.key)).holder
            await server.stop(0)
        return found

    assert asyncio.run(scenario()) == {
        "plaintext replica": PortHolder.REPLICA, "nothing": PortHolder.NOBODY,
        "http server": PortHolder.OTHER, "tls replica": PortHolder.REPLICA,
        "tls stranger": PortHolder.OTHER}


# Starts child processes (engine processes, the CLI, model exports): not in `make unit`.
pytestmark = pytest.mark.processes
