"""The supervisor behind `lmforge up`: streams before the state file, `starting` until consumed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import pytest

from lmforge.contracts import subjects
from lmforge.contracts.names import ServiceName
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
