"""`lmforge status` reads what each gateway replica says of its models from /metrics."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from lmforge.cli.status import gateway_model_loading
from lmforge.runtime.nats_server import free_port


def test_pending_models_failed_loads_and_precision_are_read_and_a_silent_replica_says_so():
    registry = CollectorRegistry()
    Gauge("lmforge_gateway_models_pending", "", registry=registry).set(2)
    failures = Counter("lmforge_gateway_model_load_failures", "", ["model"], registry=registry)
    failures.labels("acme").inc(3)
    Gauge("lmforge_gateway_model_precision", "", ["model", "version", "precision"],
          registry=registry).labels("acme", "v2", "int4-awq-g128").set(1)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        dead = f"http://127.0.0.1:{free_port()}/metrics"
        replicas = gateway_model_loading([f"http://127.0.0.1:{port}/metrics", dead])
    finally:
        server.shutdown()
        thread.join(5)
    assert replicas[0] == {"replica": 0, "models_pending": 2, "load_failures": {"acme": 3},
                           "precision": {"acme v2": "int4-awq-g128"},
                           "auth_required": None, "tls": None}  # not exported: unknown
    assert replicas[1]["replica"] == 1 and replicas[1]["metrics"].startswith("unreachable")


def _gateway_metrics(*, auth_required: int, tls: int) -> tuple[str, Any]:
    registry = CollectorRegistry()
    Gauge("lmforge_gateway_auth_required", "", registry=registry).set(auth_required)
    Gauge("lmforge_gateway_tls", "", registry=registry).set(tls)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    return f"http://127.0.0.1:{port}/metrics", (server, thread)


@pytest.mark.parametrize("nats_security, auth_required, tls, opened", [
    ("open", 0, 0, ["NATS runs without credentials", "without API keys", "without TLS"]),
    ("tls+credentials", 0, 1, ["without API keys"]),
    ("tls+credentials", 1, 1, []),
])
def test_status_says_what_serves_openly(nats_security, auth_required, tls, opened, tmp_path,
                                        monkeypatch, capsys):
    """From the state file (NATS) and the gateway's gauges (keys, TLS), in --json and as
    one OPEN line under the table."""
    from lmforge.cli.main import main
    from lmforge.cli.up import state_file

    url, (server, thread) = _gateway_metrics(auth_required=auth_required, tls=tls)
    home = tmp_path / "home"
    state_file(home).parent.mkdir(parents=True)
    state_file(home).write_text(json.dumps({
        "pid": os.getpid(), "nats_url": "tls://127.0.0.1:1", "gateway": "127.0.0.1:2",
        "nats": {"state": "running", "security": nats_security},
        "services": {"inference-gateway": {"state": "running", "replicas": 1, "desired": 1,
                                           "pinned": False, "restarts": 0, "pids": [],
                                           "metrics_urls": [url]}}}))
    monkeypatch.setenv("LMFORGE_HOME", str(home))
    try:
        assert main(["status", "--json"]) == 0
        security = json.loads(capsys.readouterr().out)["security"]
        assert main(["status"]) == 0
        table = capsys.readouterr().out
    finally:
        server.shutdown()
        thread.join(5)
    assert len(security["open"]) == len(opened)
    for reason, expected in zip(security["open"], opened, strict=True):
        assert expected in reason
    assert security["nats"] == ("off" if nats_security == "open" else "on")
    assert security["gateway_api_keys"] == ("on" if auth_required else "off")
    assert ("OPEN:" in table) == bool(opened)


def test_a_silent_gateway_is_unknown_not_secured():
    from lmforge.cli.security_status import security_status

    silent = [{"replica": 0, "metrics": "unreachable: refused"}]
    found = security_status({"security": "tls+credentials"}, silent)
    assert found["gateway_api_keys"] == found["gateway_tls"] == "unknown"
    assert found["open"] == []
