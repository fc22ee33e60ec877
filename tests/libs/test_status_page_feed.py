"""`lmforge ui`: the feed follows a real NATS and the server renders what it folded.

The supervisor is stood in for by its state file (this test's pid as its own, as in
test_cli_follow.py) naming a gateway replica whose /metrics is a prometheus-client
server; the events, the dead letter and the cost ledger entry are written to a real
nats-server the way the services write them. The page in a real browser, during a
real run under `lmforge up`, is tests/e2e/test_pipeline.py's.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from lmforge.bus import ensure_kv, ensure_streams
from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import event_headers
from lmforge.runtime.nats_server import free_port
from lmforge.runtime.supervisor import state_file
from lmforge.security.nats_connect import NatsAuth
from lmforge.ui.feed import StatusFeed
from lmforge.ui.server import StatusPageServer

pytestmark = pytest.mark.connected


def _write_state(home: Path, nats_url: str, gateway_metrics: str) -> None:
    state_file(home).parent.mkdir(parents=True, exist_ok=True)
    service = {"state": "running", "replicas": 1, "desired": 1, "pinned": False,
               "restarts": 0, "pids": [os.getpid()]}
    state_file(home).write_text(json.dumps({
        "pid": os.getpid(), "nats_url": nats_url,
        "nats": {"state": "running", "security": "open", "client_creds": "/secret/path"},
        "gateway": "127.0.0.1:1", "openai_base_url": "http://127.0.0.1:2/v1",
        "home": str(home),
        "services": {"trainer": {**service, "restarts": 2, "metrics_urls": []},
                     "inference-gateway": {**service, "metrics_urls": [gateway_metrics]}}}))


async def _publish(url: str, *events: Message, dead_letter: bytes = b"",
                   ledger: dict[str, Any] | None = None) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        for n, event in enumerate(events):
            subject = subjects.for_message(event)
            await js.publish(subject.for_tenant(str(getattr(event, "tenant", ""))),
                             event.SerializeToString(), timeout=5,
                             headers=event_headers(event, msg_id=f"{time.time()}:{n}"))
        if dead_letter:
            await js.publish(f"{subjects.DEAD_LETTER_PREFIX}.data-prep", dead_letter, timeout=5)
        if ledger:
            kv = await ensure_kv(js, Bucket.COST_LEDGER)
            for key, entry in ledger.items():
                await kv.put(key, json.dumps(entry).encode())
    finally:
        await nc.close()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait_for(read: Callable[[], Any], ok: Callable[[Any], bool], timeout_s: float = 20) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout_s:.0f}s: {value}")
        time.sleep(0.1)


@pytest.fixture
def gateway_metrics():
    registry = CollectorRegistry()
    Gauge("lmforge_gateway_model_precision", "", ["model", "version", "precision"],
          registry=registry).labels("tiny", "v1", "int4-awq-g128").set(1)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    yield f"http://127.0.0.1:{port}/metrics"
    server.shutdown()
    thread.join(5)


def test_the_page_shows_a_run_advancing_its_failures_dead_letters_models_and_cost(
        nats_server, tmp_path, gateway_metrics):
    home = tmp_path / "home"
    _write_state(home, nats_server.url, gateway_metrics)
    run = "r1"
    asyncio.run(_publish(
        nats_server.url,
        ev.DatasetReady(run_id=run, model_name="tiny<script>", dataset_uri="/data/x.txt"),
        ev.DatasetPrepared(run_id=run, model_name="tiny<script>"),
        ev.TrainingScheduled(run_id=run, plan=ev.ResourcePlan(max_steps=40)),
        ev.TrainingProgress(run_id=run, step=5, total_steps=40, loss=3.5),
        ev.StageFailed(run_id="r2", stage="data-prep", reason="dataset /nope does not exist",
                       deliveries=1, dead_lettered=True),
        dead_letter=b"not an event", ledger={run: {"total_usd": 0.0123, "charges": {}}}))

    feed = StatusFeed(home, nats_url=lambda: nats_server.url, nats_auth=NatsAuth,
                      refresh_s=0.2)
    server = StatusPageServer(("127.0.0.1", 0), feed, poll_ms=250)
    feed.start()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        def status() -> dict[str, Any]:
            return json.loads(_get(server.url + "api/status")[1])

        snapshot = _wait_for(status, lambda s: any(r["step"] == 5 for r in s["runs"])
                             and s["dead_letters"] and s["cost"]["runs_usd"])
        (mine,) = [r for r in snapshot["runs"] if r["run_id"] == run]
        assert (mine["stage"], mine["status"], mine["total_steps"]) == ("trainer", "running", 40)
        assert mine["cost_usd"] == pytest.approx(0.0123)
        assert snapshot["dead_letters"] == {"data-prep": 1}
        assert [f["reason"] for f in snapshot["failures"]] == ["dataset /nope does not exist"]
        assert snapshot["models"] == [{"model": "tiny v1", "precision": "int4-awq-g128",
                                       "replicas": [0]}]
        assert {s["name"]: s["restarts"] for s in snapshot["services"]} == {
            "trainer": 2, "inference-gateway": 0}
        assert "client_creds" not in snapshot["lmforge"]["nats"]

        code, page = _get(server.url)
        assert code == 200
        assert 'data-run-id="r1"' in page and 'data-step="5"' in page
        assert "tiny&lt;script&gt;" in page and "tiny<script>" not in page
        assert "int4-awq-g128" in page and "$0.0123" in page and "data-prep 1" in page
        assert "const POLL_MS = 250;" in page

        # The run advances: the sections the page's script fetches follow it.
        asyncio.run(_publish(nats_server.url, ev.TrainingProgress(
            run_id=run, step=20, total_steps=40, loss=2.0)))
        sections = _wait_for(lambda: json.loads(_get(server.url + "api/sections")[1]),
                             lambda b: 'data-step="20"' in b["sections"]["runs"])
        assert "step 20/40 loss 2.000" in sections["sections"]["runs"]
        # Its progress events are one line of the recent events, at the latest step.
        events = sections["sections"]["events"]
        assert events.count('data-subject="training.progress"') == 1
        assert "step 20/40" in events and "step 5/40" not in events

        assert _get(server.url + "nothing-here")[0] == 404
    finally:
        server.shutdown()
        server.server_close()
        feed.stop()


def test_without_lmforge_up_the_page_says_so(tmp_path):
    feed = StatusFeed(tmp_path / "home", nats_url=lambda: "nats://127.0.0.1:1",
                      nats_auth=NatsAuth, refresh_s=0.2).start()
    try:
        snapshot = _wait_for(feed.snapshot, lambda s: s["notes"])
    finally:
        feed.stop()
    assert snapshot["lmforge"] == {"running": False} and not snapshot["runs"]
    assert "lmforge is not running" in snapshot["notes"][0]


def test_the_page_is_not_served_past_loopback_unless_insecure():
    from lmforge.cli.main import EXIT_USAGE, main

    assert main(["ui", "--host", "0.0.0.0", "--port", "0"]) == EXIT_USAGE
