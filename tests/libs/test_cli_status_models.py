"""`lmforge status` reads what each gateway replica says of its models from /metrics."""

from __future__ import annotations

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
                           "precision": {"acme v2": "int4-awq-g128"}}
    assert replicas[1]["replica"] == 1 and replicas[1]["metrics"].startswith("unreachable")
