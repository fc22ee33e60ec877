"""/healthz, /readyz and /metrics on one port: what the kubelet and Prometheus will ask."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from lmforge.probes import Health, serve_probes
from tests.conftest import REPO_ROOT


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def probes() -> Iterator[tuple[Health, int, CollectorRegistry]]:
    health, registry = Health(stale_after_s=0.2), CollectorRegistry()
    server = serve_probes(0, host="127.0.0.1", health=health, registry=registry)
    yield health, server.server_address[1], registry
    server.shutdown()
    server.server_close()


def test_readyz_is_503_until_the_service_consumes_and_says_why(probes):
    health, port, _ = probes
    assert _get(port, "/readyz") == (503, "starting: not consuming yet\n")
    health.set_ready()
    assert _get(port, "/readyz") == (200, "ready\n")


def test_readyz_fails_while_a_required_connection_is_down(probes):
    health, port, _ = probes
    connected = {"nats": True}
    health.require("nats", lambda: connected["nats"])
    health.set_ready()
    assert _get(port, "/readyz")[0] == 200
    connected["nats"] = False
    assert _get(port, "/readyz") == (503, "not ready: nats down\n")


def test_readyz_fails_once_draining_but_healthz_stays_up(probes):
    health, port, _ = probes
    health.set_ready()
    health.beat()
    health.set_not_ready("draining after SIGTERM")
    assert _get(port, "/readyz") == (503, "draining after SIGTERM\n")
    assert _get(port, "/healthz")[0] == 200


def test_healthz_fails_when_the_event_loop_stops_beating(probes):
    health, port, _ = probes
    assert _get(port, "/healthz") == (200, "alive (starting)\n")
    health.beat()
    assert _get(port, "/healthz") == (200, "alive\n")
    time.sleep(0.3)
    status, body = _get(port, "/healthz")
    assert status == 503 and body.startswith("event loop silent for")


def test_metrics_are_served_on_the_same_port(probes):
    _, port, registry = probes
    Counter("lmforge_probe_test_total", "A counter for this test.", registry=registry).inc(3)
    status, body = _get(port, "/metrics")
    assert status == 200
    assert "lmforge_probe_test_total 3.0" in body
    assert _get(port, "/nope")[0] == 404


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.processes
def test_a_service_process_is_ready_once_it_consumes_and_unready_when_draining(nats_server,
                                                                                tmp_path):
    """The scheduler as Kubernetes runs it: probes on LMFORGE_METRICS_PORT, SIGTERM drains."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT / 'libs'}{os.pathsep}{REPO_ROOT}",
           "LMFORGE_NATS_URL": nats_server.url, "LMFORGE_HOME": str(tmp_path / "home"),
           "LMFORGE_METRICS_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "services.scheduler"], env=env,
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = _get(port, "/readyz")
            except OSError:  # not listening yet
                status = None
            if status and status[0] == 200:
                break
            time.sleep(0.2)
        assert status == (200, "ready\n"), proc.stderr.read().decode() if proc.poll() else status
        assert _get(port, "/healthz") == (200, "alive\n")
        assert "lmforge_events_consumed_total" in _get(port, "/metrics")[1]
        nats_server.stop()  # NATS gone: not ready, still alive (no restart storm)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _get(port, "/readyz")[0] == 200:
            time.sleep(0.2)
        assert _get(port, "/readyz") == (503, "not ready: nats down\n")
        assert _get(port, "/healthz")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
