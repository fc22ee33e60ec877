"""kill -9 of the embedded nats-server under `lmforge up -d`: the supervisor brings it back.

It used to stay dead (6 minutes and counting) while `status` showed every
service `running` against the dead URL. Now `status` says NATS is down and the
services disconnected, the supervisor restarts it on the same port and store
(counted), the services reconnect by themselves, and a run published
afterwards is consumed. The figures are printed (pytest -s) for the record.
The same port is used again after `lmforge down` and `up` of the home.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest

from lmforge.cli.main import main as lmforge_main
from lmforge.cli.up import home_nats_auth
from lmforge.contracts import subjects
from tests.conftest import TEST_DATA

pytestmark = pytest.mark.e2e


def _small_corpus(directory: Path, records: int = 300) -> Path:
    """The first `records` fortunes of the shipped sample: data-prep takes seconds."""
    text = (TEST_DATA / "fortunes-sample.txt").read_text()
    corpus = directory / "fortunes-head.txt"
    corpus.write_text("\n%\n".join(text.split("\n%\n")[:records]) + "\n")
    return corpus


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    data = tmp_path / "data"
    data.mkdir()
    values = {
        "LMFORGE_HOME": str(tmp_path / "home"),
        "LMFORGE_DATA_ROOTS": str(data),
        "LMFORGE_DATAPREP_VOCAB_SIZE": "512",
        "LMFORGE_DATAPREP_SEQ_LEN": "64",
        "LMFORGE_SCHEDULER_TIME_BUDGET_S": "2",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return {**os.environ, **values}


def lmforge(env: dict[str, str], *args: str, timeout: float = 180) -> str:
    done = subprocess.run([sys.executable, "-m", "lmforge.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"lmforge {' '.join(args)}: {done.returncode}\n{done.stderr}"
    return done.stdout


def _status(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """`lmforge status --json`, in this process so that polling it is cheap."""
    capsys.readouterr()
    lmforge_main(["status", "--json"])
    return json.loads(capsys.readouterr().out)


async def _first_outcome(url: str, run_id: str, timeout_s: float, home: Path) -> str:
    """The subject of the first dataset.prepared or stage.failed of `run_id`."""
    nc = await nats.connect(url, **home_nats_auth(home, "admin").connect_options())
    try:
        sub = await nc.jetstream().subscribe("lmforge.>", ordered_consumer=True,
                                             stream=subjects.STREAM)
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=remaining)
            except nats.errors.TimeoutError:
                break
            if msg.subject in (subjects.DATASET_PREPARED.name, subjects.STAGE_FAILED.name) \
                    and subjects.by_name(msg.subject).decode(msg.data).run_id == run_id:
                return msg.subject
        raise AssertionError(f"run {run_id}: no dataset.prepared within {timeout_s:.0f}s")
    finally:
        await nc.close()


def test_a_killed_nats_server_comes_back_on_its_port_and_a_new_run_is_consumed(
        env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = _small_corpus(tmp_path / "data")
    lmforge(env, "up", "-d", "--gateway-port", "0")
    try:
        # The port outlives `down` and `up` of the same home: one URL to remember.
        first_url = _status(capsys)["nats_url"]
        lmforge(env, "down")
        lmforge(env, "up", "-d", "--gateway-port", "0")
        before = _status(capsys)
        assert before["nats_url"] == first_url
        assert before["nats"]["state"] == "running" and before["nats"]["restarts"] == 0
        assert {s["state"] for s in before["services"].values()} == {"running"}

        killed_at = time.monotonic()
        os.kill(before["nats"]["pid"], signal.SIGKILL)
        nats_seen: list[str] = []
        services_seen: set[str] = set()
        nats_back = 0.0
        deadline = killed_at + 30
        while True:
            now = _status(capsys)
            if not nats_seen or nats_seen[-1] != now["nats"]["state"]:
                nats_seen.append(now["nats"]["state"])
            if now["nats"]["state"] != "running":
                services_seen |= {s["state"] for s in now["services"].values()}
            elif not nats_back and now["nats"]["pid"] != before["nats"]["pid"]:
                nats_back = time.monotonic() - killed_at
            if nats_back and {s["state"] for s in now["services"].values()} == {"running"}:
                break
            assert time.monotonic() < deadline, f"not back after 30s: {nats_seen} {now}"
            time.sleep(0.05)
        all_running = time.monotonic() - killed_at

        assert "down" in nats_seen, nats_seen  # status said so while it was
        assert services_seen == {"disconnected"}, services_seen  # not `running`
        assert now["nats_url"] == before["nats_url"] and now["nats"]["url"] == now["nats_url"]
        assert now["nats"]["restarts"] == 1

        published_at = time.monotonic()
        lmforge(env, "run", str(corpus), "--model-name", "after", "--run-id", "after-restart")
        outcome = asyncio.run(_first_outcome(now["nats_url"], "after-restart", 120,
                                             tmp_path / "home"))
        prepared = time.monotonic() - published_at
        assert outcome == subjects.DATASET_PREPARED.name
        with capsys.disabled():
            print(f"\nNATS kill -9 -> status running again: {nats_back:.2f}s; every service "
                  f"running: {all_running:.2f}s; a run published then -> dataset.prepared: "
                  f"{prepared:.2f}s (states seen: {nats_seen})")
    finally:
        subprocess.run([sys.executable, "-m", "lmforge.cli.main", "down"], env=env,
                       capture_output=True, timeout=120)
