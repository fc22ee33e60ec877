"""The CLI against a NATS that does not answer: one clear line and exit 1, in seconds.

`lmforge runs` and `lmforge run` used to hang there (nats-py's first connect
retries forever once reconnects are unlimited), printing a traceback every
two seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.runtime.nats_server import free_port
from lmforge.runtime.supervisor import state_file

BOUND_S = 8.0
"""The CLI gives up after CONNECT_TIMEOUT_S (3 s); a Python start-up on a busy core on top."""


@pytest.mark.parametrize("argv", [
    ["runs"],
    ["run", "{data}", "--model-name", "m", "--follow"],
    ["scale", "trainer=1"],
], ids=["runs", "run", "scale"])
def test_a_nats_command_fails_fast_with_one_line_when_nats_is_down(tmp_path: Path,
                                                                    argv: list[str]):
    home = tmp_path / "home"
    dead = f"nats://127.0.0.1:{free_port()}"
    # What `lmforge status` read during the outage: lmforge is up, its NATS is not.
    state_file(home).parent.mkdir(parents=True)
    state_file(home).write_text(json.dumps({"pid": os.getpid(), "nats_url": dead,
                                            "services": {}}))
    data = tmp_path / "corpus.txt"
    data.write_text("some text\n")
    env = {**os.environ, "LMFORGE_HOME": str(home), "LMFORGE_NATS_URL": "nats://127.0.0.1:1"}
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "lmforge.cli.main", *(a.format(data=data) for a in argv)],
            env=env, capture_output=True, text=True, timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"lmforge {argv[0]} still running after {BOUND_S:.0f}s")
    took = time.monotonic() - started
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"cannot reach NATS at {dead}" in lines[0], lines[0]
    print(f"lmforge {argv[0]} against a dead NATS: exit 1 after {took:.1f}s")


# Starts child processes (engine processes, the CLI, model exports): not in `make unit`.
pytestmark = pytest.mark.processes
