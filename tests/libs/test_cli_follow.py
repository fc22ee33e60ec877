"""`lmforge run --follow` across a restart of NATS: it reads the URL again and goes on.

It used to stay attached to the dead URL forever, and could not follow a server
that came back on another port. Here the server is killed after the first
events, comes back on the same store under a new port (written to the state
file, as `lmforge up` would), and the run's remaining events are published
there: the follower must show each event exactly once and end with the run.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nats
import nats.js.errors
import pytest
from google.protobuf.message import Message

from lmforge.bus import ensure_streams
from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import event_headers
from lmforge.runtime.nats_server import NatsServer
from lmforge.runtime.supervisor import state_file

pytestmark = pytest.mark.connected

RUN = "followed"


def _write_state(home: Path, url: str) -> None:
    """The state file of a running `lmforge up` (this test's pid stands for its own)."""
    state_file(home).parent.mkdir(parents=True, exist_ok=True)
    state_file(home).write_text(json.dumps({"pid": os.getpid(), "nats_url": url,
                                            "services": {}}))


async def _publish(url: str, *events: Message) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        for event in events:
            subject = subjects.for_message(event)
            await js.publish(subject.name, event.SerializeToString(), timeout=5,
                             headers=event_headers(event, msg_id=f"{RUN}:{subject.name}"))
    finally:
        await nc.close()


async def _stored(url: str, subject: str) -> bool:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().get_last_msg(subjects.STREAM, subject)
        return True
    except nats.js.errors.NotFoundError:
        return False
    finally:
        await nc.close()


def _wait_for(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} after {timeout_s:.0f}s"
        time.sleep(0.05)


def test_run_follow_reconnects_to_the_url_in_the_state_file_after_nats_restarts(
        tmp_path: Path):
    home, store = tmp_path / "home", tmp_path / "nats"
    first = NatsServer(store_dir=store, log_file=tmp_path / "nats.log").start()
    second = NatsServer(store_dir=store, log_file=tmp_path / "nats.log")
    asyncio.run(_publish(first.url))  # the streams, as `lmforge up` makes them
    _write_state(home, first.url)
    data = tmp_path / "corpus.txt"
    data.write_text("some text\n")
    out, err = tmp_path / "follow.out", tmp_path / "follow.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        follower = subprocess.Popen(
            [sys.executable, "-m", "lmforge.cli.main", "run", str(data), "--model-name", "m",
             "--run-id", RUN, "--follow", "--json", "--timeout", "120"],
            env={**os.environ, "LMFORGE_HOME": str(home)}, stdout=stdout, stderr=stderr)
    try:
        _wait_for(lambda: asyncio.run(_stored(first.url, subjects.DATASET_READY.pattern)),
                  "the follower never published dataset.ready")
        asyncio.run(_publish(first.url, ev.DatasetPrepared(run_id=RUN)))
        _wait_for(lambda: subjects.DATASET_PREPARED.name in out.read_text(),
                  "the follower never showed dataset.prepared")

        first.kill()
        second.start()  # same store, another port: only the state file says where
        _write_state(home, second.url)
        asyncio.run(_publish(
            second.url, ev.TrainingScheduled(run_id=RUN),
            ev.ModelTrained(run_id=RUN, heldout_perplexity=9.5, steps=3),
            ev.ModelQuantized(run_id=RUN), ev.ModelExported(run_id=RUN),
            ev.ModelDeployed(run_id=RUN, model_name="m")))
        assert follower.wait(timeout=30) == 0, err.read_text()
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        first.stop()
        second.stop()
    shown = [json.loads(line)["subject"] for line in out.read_text().splitlines()]
    assert shown == [subjects.DATASET_READY.name, subjects.DATASET_PREPARED.name,
                     subjects.TRAINING_SCHEDULED.name, subjects.MODEL_TRAINED.name,
                     subjects.MODEL_QUANTIZED.name, subjects.MODEL_EXPORTED.name,
                     subjects.MODEL_DEPLOYED.name]  # each once, none lost
    log = err.read_text()
    assert f"following again on NATS at {second.url}" in log, log
    assert "served as model m" in log and "Traceback" not in log, log
