"""`lmforge up`: an event published the moment `status` shows the NATS URL is not lost.

A core NATS publish to a subject no stream captures yet is dropped without an
error, so `up` must create the streams before the URL appears anywhere. The
test publishes with plain core NATS (no JetStream acknowledgement to wait for)
as soon as `lmforge status --json` shows the URL, while the services are still
starting, and expects the run to begin.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest

from lmforge.cli.main import main as lmforge_main
from lmforge.cli.up import home_nats_auth
from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from tests.conftest import TEST_DATA

pytestmark = pytest.mark.e2e

RUN_ID = "published-at-start-up"


def _small_corpus(directory: Path, records: int = 300) -> Path:
    """The first `records` fortunes of the shipped sample: data-prep takes seconds."""
    text = (TEST_DATA / "fortunes-sample.txt").read_text()
    corpus = directory / "fortunes-head.txt"
    corpus.write_text("\n%\n".join(text.split("\n%\n")[:records]) + "\n")
    return corpus


def _status(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """`lmforge status --json`, run in this process so the first sighting is immediate."""
    lmforge_main(["status", "--json"])
    return json.loads(capsys.readouterr().out)


async def _publish_core(url: str, home: Path, event: ev.DatasetReady) -> None:
    # as an outside publisher does: the `client` role
    auth = home_nats_auth(home, "client")
    event.tenant = auth.tenant  # the credential's tenant, on the subject it may publish
    nc = await nats.connect(url, **auth.connect_options())
    try:
        await nc.publish(subjects.DATASET_READY.for_tenant(auth.tenant),
                         event.SerializeToString())
        await nc.flush()
    finally:
        await nc.close()


async def _run_began(url: str, home: Path, timeout_s: float) -> str:
    """The subject of the first dataset.prepared or stage.failed of RUN_ID; fails at once
    if the stream never kept the dataset.ready."""
    nc = await nats.connect(url, **home_nats_auth(home, "admin").connect_options())
    try:
        js = nc.jetstream()
        try:
            kept = await js.get_last_msg(subjects.STREAM, subjects.DATASET_READY.pattern)
        except nats.js.errors.NotFoundError:
            kept = None
        assert kept is not None and kept.data is not None and subjects.DATASET_READY.decode(
            kept.data).run_id == RUN_ID, "the dataset.ready published at start-up was lost"
        sub = await js.subscribe("lmforge.>", ordered_consumer=True, stream=subjects.STREAM)
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=remaining)
            except nats.errors.TimeoutError:
                break
            if msg.subject not in (subjects.DATASET_PREPARED.name, subjects.STAGE_FAILED.name):
                continue
            if subjects.by_name(msg.subject).decode(msg.data).run_id == RUN_ID:
                return msg.subject
        raise AssertionError(f"dataset.ready was kept but no run began within {timeout_s}s")
    finally:
        await nc.close()


def test_a_core_nats_publish_the_moment_status_shows_the_url_starts_a_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    corpus = _small_corpus(data)
    env = {
        "LMFORGE_HOME": str(tmp_path / "home"),
        "LMFORGE_DATA_ROOTS": str(data),
        "LMFORGE_DATAPREP_VOCAB_SIZE": "512",
        "LMFORGE_DATAPREP_SEQ_LEN": "64",
        "LMFORGE_SCHEDULER_TIME_BUDGET_S": "2",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "home").mkdir()
    with (tmp_path / "up.log").open("wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "lmforge.cli.main", "up", "-d", "--gateway-port", "0"],
            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "nats_url" not in (status := _status(capsys)):
            assert up.poll() in (None, 0), (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, "status never showed a NATS URL"
            time.sleep(0.01)
        event = ev.DatasetReady(run_id=RUN_ID, dataset_uri=corpus.as_uri(), format="text",
                                model_name="early", schema_version=1)
        asyncio.run(_publish_core(status["nats_url"], tmp_path / "home", event))
        # Published before anything consumed: every service still said `starting`.
        assert {s["state"] for s in status["services"].values()} == {"starting"}, status

        assert asyncio.run(_run_began(status["nats_url"], tmp_path / "home", timeout_s=180)) == \
            subjects.DATASET_PREPARED.name

        # Once each service consumes, status says so.
        while up.poll() is None:
            assert time.monotonic() < deadline + 180, "lmforge up -d never returned"
            time.sleep(0.2)
        assert up.returncode == 0, (tmp_path / "up.log").read_text()
        assert {s["state"] for s in _status(capsys)["services"].values()} == {"running"}
    finally:
        lmforge_main(["down"])
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
