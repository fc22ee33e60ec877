"""The supervisor behind `lmforge up`: streams before the state file, `starting` until consumed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import pytest

from lmforge.cli.main import main as lmforge_main
from lmforge.contracts import subjects
from lmforge.contracts.names import ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.runtime.nats_server import NatsServer
from lmforge.runtime.supervisor import NatsUnreachable, Supervisor, service_phase, state_file

# A stand-in service: waits for its go-file, then says it consumes exactly as a
# real one does (lmforge.service.mark_ready), then idles until SIGTERM.
FAKE_SERVICE = """
import os, pathlib, time
from lmforge.service import mark_ready
go = pathlib.Path(os.environ["TEST_GO_DIR"], os.environ["LMFORGE_REPLICA"])
while not go.exists():
    time.sleep(0.05)
mark_ready()
time.sleep(600)
"""


@pytest.mark.parametrize(("desired", "alive", "ready", "phase"), [
    (0, 0, 0, "stopped"),
    (2, 2, 0, "starting"),
    (2, 2, 1, "starting"),
    (2, 2, 2, "running"),
    (2, 1, 1, "restarting"),
    (1, 0, 0, "restarting"),
])
def test_service_phase(desired, alive, ready, phase):
    assert service_phase(desired=desired, alive=alive, ready=ready) == phase


@pytest.mark.parametrize(("desired", "alive", "ready", "phase"), [
    (1, 1, 1, "disconnected"),  # it consumed, but from a server that is gone
    (2, 2, 1, "disconnected"),
    (1, 0, 0, "restarting"),  # its own process is down: that is what to say first
    (0, 0, 0, "stopped"),
])
def test_a_service_whose_processes_run_while_nats_is_down_is_disconnected(
        desired, alive, ready, phase):
    assert service_phase(desired=desired, alive=alive, ready=ready, nats_up=False) == phase


def test_a_gateway_held_on_an_unknown_load_says_so_in_status(tmp_path, monkeypatch, capsys):
    """The autoscaler holds replicas when no gateway replica answers /metrics; `lmforge
    status` shows that from the latest scaling.decided, and clears it once load is seen."""
    gateway = ServiceName.INFERENCE_GATEWAY
    supervisor = Supervisor(home=tmp_path / "home", nats_url="nats://127.0.0.1:1", env={},
                            gateway="", gateway_metrics_base=0, services=[gateway])
    reason = "load unknown (no gateway replica answered /metrics): holding 3"
    supervisor.apply(ev.ScalingDecided(services=[ev.ServiceScale(
        service=gateway, replicas=3, reason=reason, load_unknown=True, policy="held")]))
    supervisor.write_state()
    monkeypatch.setenv("LMFORGE_HOME", str(supervisor.home))
    monkeypatch.setenv("COLUMNS", "240")  # one table row per service, unwrapped

    assert lmforge_main(["status"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if gateway in line)
    assert "load unknown: " + reason in row
    assert lmforge_main(["status", "--json"]) == 0
    held = json.loads(capsys.readouterr().out)["services"][gateway]
    assert (held["load_unknown"], held["desired"], held["scaling_reason"]) == (True, 3, reason)

    supervisor.apply(ev.ScalingDecided(services=[ev.ServiceScale(
        service=gateway, replicas=3, reason="55.0 req/s", load=55.0, policy="reactive")]))
    supervisor.write_state()
    assert lmforge_main(["status"]) == 0
    assert "load unknown" not in capsys.readouterr().out


def _wait_for(condition: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} after {timeout_s:.0f}s")


def test_a_service_is_starting_until_every_replica_consumes(tmp_path):
    go = tmp_path / "go"
    go.mkdir()
    supervisor = Supervisor(
        home=tmp_path / "home", nats_url="nats://127.0.0.1:1", env={"TEST_GO_DIR": str(go)},
        gateway="", gateway_metrics_base=0, services=[ServiceName.DATA_PREP], stop_grace_s=10,
        commands={ServiceName.DATA_PREP: [sys.executable, "-c", FAKE_SERVICE]})
    supervisor.services[ServiceName.DATA_PREP].desired = 2
    supervisor.nats_connected = True  # as run() finds it: phases of the processes alone

    def data_prep() -> dict[str, Any]:
        supervisor.reconcile()
        return supervisor.snapshot()["services"]["data-prep"]

    try:
        first = data_prep()
        assert (first["state"], first["replicas"], len(first["pids"])) == ("starting", 0, 2)
        (go / "0").touch()
        _wait_for(lambda: data_prep()["replicas"] == 1, "replica 0 never became ready")
        assert data_prep()["state"] == "starting"  # one of two consumes: not yet running
        (go / "1").touch()
        running = _wait_for(lambda: (s := data_prep())["state"] == "running" and s,
                            "data-prep never became running")
        assert running["replicas"] == 2

        # A replica that dies is no longer counted; its restart starts over.
        victim = supervisor.services[ServiceName.DATA_PREP].replicas[0].process
        assert victim is not None
        victim.kill()
        victim.wait()
        assert data_prep()["state"] == "restarting"
        # Restarted after its backoff; its go-file is there, so it consumes at once.
        again = _wait_for(lambda: (s := data_prep())["state"] == "running" and s,
                          "the killed replica was not restarted")
        assert again["restarts"] == 1 and victim.pid not in again["pids"]
    finally:
        asyncio.run(supervisor.shutdown())
    assert supervisor.snapshot()["services"]["data-prep"]["state"] == "stopped"


@pytest.mark.connected
def test_the_state_file_shows_the_nats_url_only_once_the_streams_exist(nats_server, tmp_path):
    home = tmp_path / "home"
    supervisor = Supervisor(home=home, nats_url=nats_server.url, env={}, gateway="",
                            gateway_metrics_base=0, services=[])

    async def scenario() -> dict[str, Any]:
        stop = asyncio.Event()
        running = asyncio.create_task(supervisor.run(stop))
        try:
            deadline = time.monotonic() + 30
            while not state_file(home).exists():
                assert time.monotonic() < deadline, "no state file after 30s"
                assert not running.done(), running
                await asyncio.sleep(0.01)
            state = json.loads(state_file(home).read_text())
            nc = await nats.connect(state["nats_url"])
            try:
                js = nc.jetstream()
                await js.stream_info(subjects.STREAM)
                await js.stream_info(subjects.DEAD_LETTER_STREAM)
            finally:
                await nc.close()
            return state
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await running

    state = asyncio.run(scenario())
    assert state["nats_url"] == nats_server.url


def test_an_unreachable_nats_stops_start_up_before_any_state(tmp_path: Path):
    home = tmp_path / "home"
    supervisor = Supervisor(home=home, nats_url="nats://127.0.0.1:1", env={}, gateway="",
                            gateway_metrics_base=0, services=[ServiceName.DATA_PREP],
                            nats_timeout_s=1)
    with pytest.raises(NatsUnreachable, match=r"cannot reach NATS at nats://127\.0\.0\.1:1 "):
        asyncio.run(supervisor.run(asyncio.Event()))
    assert not state_file(home).exists()
    assert supervisor.services[ServiceName.DATA_PREP].replicas == []  # nothing was started


@pytest.mark.connected
def test_a_killed_nats_server_is_restarted_on_its_port_and_store(tmp_path: Path):
    """kill -9 of the embedded nats-server: `status` says down, then the supervisor starts
    it again on the same URL and store (what was stored is still there), counted."""
    home = tmp_path / "home"
    server = NatsServer(store_dir=home / "nats", log_file=home / "logs" / "nats.log")
    supervisor = Supervisor(home=home, nats_server=server, env={}, gateway="",
                            gateway_metrics_base=0, services=[])

    def nats_state() -> dict[str, Any]:
        try:
            return json.loads(state_file(home).read_text())["nats"]
        except (OSError, ValueError):
            return {}

    async def stored_subjects(url: str) -> int:
        nc = await nats.connect(url)
        try:
            return (await nc.jetstream().stream_info(subjects.STREAM)).state.messages
        finally:
            await nc.close()

    async def publish(url: str) -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().publish(subjects.DATASET_READY.for_tenant(""), b"", timeout=5)
        finally:
            await nc.close()

    async def scenario() -> tuple[list[str], dict[str, Any], int]:
        stop = asyncio.Event()
        running = asyncio.create_task(supervisor.run(stop))
        try:
            while nats_state().get("state") != "running":
                assert not running.done(), running
                await asyncio.sleep(0.05)
            first = nats_state()
            await publish(server.url)
            os.kill(first["pid"], signal.SIGKILL)
            seen: list[str] = []
            deadline = time.monotonic() + 20
            while (now := nats_state()).get("state") != "running" or now["pid"] == first["pid"]:
                assert time.monotonic() < deadline, f"NATS not back after 20s: {seen}"
                if now.get("state") and (not seen or seen[-1] != now["state"]):
                    seen.append(now["state"])
                await asyncio.sleep(0.02)
            return seen, now, await stored_subjects(now["url"])
        finally:
            stop.set()
            await running

    seen, back, kept = asyncio.run(scenario())
    assert "down" in seen, seen
    assert back["url"] == server.url and back["restarts"] == 1 and back["embedded"]
    assert kept == 1  # the store came back with it
    assert not server.alive()  # and the supervisor stopped it on the way out


def test_a_replica_scaled_away_is_reaped_not_left_a_zombie(tmp_path):
    go = tmp_path / "go"
    go.mkdir()
    (go / "0").touch()
    (go / "1").touch()
    supervisor = Supervisor(
        home=tmp_path / "home", nats_url="nats://127.0.0.1:1", env={"TEST_GO_DIR": str(go)},
        gateway="", gateway_metrics_base=0, services=[ServiceName.DATA_PREP], stop_grace_s=10,
        commands={ServiceName.DATA_PREP: [sys.executable, "-c", FAKE_SERVICE]})
    state = supervisor.services[ServiceName.DATA_PREP]
    state.desired = 2
    try:
        supervisor.reconcile()
        retired = state.replicas[1].process
        assert retired is not None
        state.desired = 1
        supervisor.reconcile()

        def reaped() -> bool:
            supervisor.reap_retired()
            return retired.returncode is not None and not supervisor.retiring

        _wait_for(reaped, "the scaled-away replica was never reaped")
        # Reaped: the pid is gone from the process table, not a zombie.
        assert not Path(f"/proc/{retired.pid}").exists()
    finally:
        asyncio.run(supervisor.shutdown())


# A stand-in service that serves /metrics on the port the supervisor gave it, the way
# `lmforge.service.run` does, and says it consumes.
METRICS_SERVICE = """
import os, time
from prometheus_client import Counter, start_http_server
from lmforge.service import mark_ready
Counter("stand_in_started", "starts").inc()
start_http_server(int(os.environ["LMFORGE_METRICS_PORT"]))
mark_ready()
time.sleep(600)
"""


def test_every_replica_serves_metrics_on_a_port_that_status_lists_and_keeps(tmp_path):
    from lmforge.cli.metrics import read_samples
    from lmforge.runtime.scrape_targets import targets_file

    supervisor = Supervisor(
        home=tmp_path / "home", nats_url="nats://127.0.0.1:1", env={}, gateway="",
        gateway_metrics_base=0, services=[ServiceName.DATA_PREP, ServiceName.TRAINER],
        stop_grace_s=10,
        commands={name: [sys.executable, "-c", METRICS_SERVICE]
                  for name in (ServiceName.DATA_PREP, ServiceName.TRAINER)})
    supervisor.services[ServiceName.DATA_PREP].desired = 2
    supervisor.nats_connected = True

    def services() -> dict[str, Any]:
        supervisor.reconcile()
        supervisor.write_state()
        return supervisor.snapshot()["services"]

    try:
        running = _wait_for(lambda: all(s["state"] == "running" for s in services().values())
                            and services(), "the stand-ins never ran")
        urls = {name: s["metrics_urls"] for name, s in running.items()}
        assert [len(urls["data-prep"]), len(urls["trainer"])] == [2, 1]
        every = [url for found in urls.values() for url in found]
        assert len(set(every)) == 3
        for url in every:
            assert read_samples(url, ["stand_in_started_total"], timeout_s=5)[
                "stand_in_started_total"], url
        targets = json.loads(targets_file(tmp_path / "home").read_text())
        assert sorted((t["labels"]["service"], t["labels"]["replica"]) for t in targets) == [
            ("data-prep", "0"), ("data-prep", "1"), ("trainer", "0")]
        assert sorted(f"http://{t['targets'][0]}/metrics" for t in targets) == sorted(every)

        # A restarted replica is the same Prometheus target: same port.
        victim = supervisor.services[ServiceName.TRAINER].replicas[0].process
        assert victim is not None
        victim.kill()
        victim.wait()
        again = _wait_for(lambda: (s := services()["trainer"])["restarts"] == 1
                          and s["state"] == "running" and s, "the trainer was not restarted")
        assert again["metrics_urls"] == urls["trainer"]
        _wait_for(lambda: read_samples(urls["trainer"][0], ["stand_in_started_total"],
                                       timeout_s=5), "the restarted trainer serves no metrics")
    finally:
        asyncio.run(supervisor.shutdown())
