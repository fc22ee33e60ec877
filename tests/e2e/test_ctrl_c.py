"""Ctrl-C on a foreground `lmforge up` mid-training: out in seconds, the job handed back.

A terminal's Ctrl-C sends SIGINT to its whole foreground process group. The
embedded processes (nats-server and services) live in their own groups, so
only the supervisor hears it, and it stops them in order: the services first
(the trainer checkpoints and publishes `training.preempted`), NATS last. It
used to take 62 s and lose the hand-back: NATS shared the terminal's group and
died first. The stream is read afterwards from the same store.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import nats.errors
import pytest

from lmforge.cli.up import home_nats_auth, read_state
from lmforge.contracts import subjects
from lmforge.runtime.nats_server import NatsServer
from tests.conftest import TEST_DATA

pytestmark = pytest.mark.e2e

RUN = "interrupted"
EXIT_WITHIN_S = 20.0


async def _first_of(url: str, subject: str, timeout_s: float, home: Path) -> bool:
    """Whether an event of `subject` for RUN is in the stream (waiting up to `timeout_s`)."""
    nc = await nats.connect(url, **home_nats_auth(home, "admin").connect_options())
    try:
        sub = await nc.jetstream().subscribe(subject, ordered_consumer=True,
                                             stream=subjects.STREAM)
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=remaining)
            except nats.errors.TimeoutError:
                return False
            if subjects.by_name(msg.subject).decode(msg.data).run_id == RUN:
                return True
        return False
    finally:
        await nc.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_mid_training_exits_in_seconds_with_the_job_handed_back(tmp_path: Path):
    home, data = tmp_path / "home", tmp_path / "data"
    data.mkdir()
    corpus = data / "fortunes.txt"
    corpus.write_text((TEST_DATA / "fortunes-sample.txt").read_text())
    env = {**os.environ, "LMFORGE_HOME": str(home), "LMFORGE_DATA_ROOTS": str(data),
           "LMFORGE_DATAPREP_VOCAB_SIZE": "512", "LMFORGE_DATAPREP_SEQ_LEN": "64",
           "LMFORGE_SCHEDULER_TIME_BUDGET_S": "300",  # still training when interrupted
           "OMP_WAIT_POLICY": "PASSIVE"}
    # As a shell runs a foreground job: its own process group, which Ctrl-C signals.
    with (tmp_path / "up.log").open("wb") as log:
        up = subprocess.Popen([sys.executable, "-m", "lmforge.cli.main", "up",
                               "--gateway-port", "0"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ((state := read_state(home)) and {
                s["state"] for s in state["services"].values()} == {"running"}):
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, "services not running after 120s"
            time.sleep(0.2)
        subprocess.run([sys.executable, "-m", "lmforge.cli.main", "run", str(corpus),
                        "--model-name", "m", "--run-id", RUN], env=env, check=True,
                       capture_output=True, timeout=60)
        assert asyncio.run(_first_of(state["nats_url"], subjects.TRAINING_PROGRESS.name,
                                     timeout_s=180, home=home)), "no training.progress within 180s"
        state = read_state(home) or state
        children = [state["nats"]["pid"]] + [
            pid for s in state["services"].values() for pid in s["pids"]]

        interrupted = time.monotonic()
        os.killpg(up.pid, signal.SIGINT)  # the terminal's Ctrl-C
        code = up.wait(timeout=90)
        took = time.monotonic() - interrupted
    finally:
        if up.poll() is None:
            # Through the supervisor, which stops its children: a SIGKILL to its group
            # would orphan them (they live in groups of their own).
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(timeout=90)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
    log_text = (tmp_path / "up.log").read_text()
    assert took < EXIT_WITHIN_S, f"Ctrl-C took {took:.1f}s\n{log_text[-3000:]}"
    assert code == 0, log_text[-3000:]
    assert not [pid for pid in children if _alive(pid)], "processes outlived Ctrl-C"

    # The hand-back is in the stream: read it from the same store.
    server = NatsServer(store_dir=home / "nats").start()
    try:
        handed_back = asyncio.run(_first_of(server.url, subjects.TRAINING_PREEMPTED.name,
                                            timeout_s=5, home=home))
    finally:
        server.stop()
    print(f"\nCtrl-C mid-training -> exit: {took:.1f}s; training.preempted published: "
          f"{handed_back}")
    assert handed_back, "no training.preempted for the run after Ctrl-C"
