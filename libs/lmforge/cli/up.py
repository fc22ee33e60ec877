"""`lmforge up` / `lmforge down`: the embedded system on one machine.

Start-up order: the nats-server, then the JetStream streams, then the state
file with the NATS URL (what `lmforge status` reads), then the services. A
client that publishes the moment `status` shows the URL, even with plain core
NATS, finds its event kept for the services to consume once they start.

The embedded nats-server keeps its port across `down`/`up` of the same home
(`nats_server.home_server`). Every process `up` starts is in its own process
group: a terminal's Ctrl-C reaches only the supervisor, which stops the
services first (the trainer checkpoints and publishes `training.preempted`)
and NATS last.

The embedded nats-server is secured by default: `up` generates (once) a
credential per service, a `client` credential for the CLI and an `admin` one,
a CA and a server certificate under `<home>/secrets` (mode 0600, directory
0700), and starts the server requiring TLS and those credentials with each
role's permissions (`lmforge.security`). `--open-nats` starts it without, and
says so in the log and in `lmforge status`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lmforge.runtime.nats_cluster import home_cluster
from lmforge.runtime.nats_server import NatsServer, free_port, home_server
from lmforge.runtime.supervisor import NatsUnreachable, Supervisor, state_file
from lmforge.security.nats_connect import NatsAuth
from lmforge.security.nats_secrets import ensure_nats_secrets

log = logging.getLogger("lmforge.up")


def read_state(home: Path) -> dict[str, Any] | None:
    """The supervisor's state if it is running, else None."""
    path = state_file(home)
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    try:
        os.kill(state["pid"], 0)
    except (OSError, KeyError):
        return None
    return state


def home_nats_auth(home: Path, role: str = "client") -> NatsAuth:
    """The `role` credential (`client` or `admin`) and CA of the running `lmforge up` of
    `home`, as its state file names them; none if it runs an open NATS (or none)."""
    nats_state = (read_state(home) or {}).get("nats") or {}
    creds, ca = nats_state.get(f"{role}_creds"), nats_state.get("ca")
    return NatsAuth.from_files(Path(creds) if creds else None, Path(ca) if ca else None)


def run_foreground(home: Path, *, nats_url: str | None, gateway_port: int,
                   env: dict[str, str], open_nats: bool = False,
                   nats_cluster: int = 0) -> int:
    """Start NATS (unless given one) and the services; run until SIGTERM/SIGINT."""
    home = home.resolve()
    if read_state(home):
        print(f"lmforge is already running with home {home}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # The home's own nats-server, on the ports it had last time (the supervisor starts
    # it first, restarts it if it dies, and stops it last).
    # With `nats_cluster`, that many routed nodes instead (`nats_cluster.home_cluster`),
    # each with the same users, permissions and TLS.
    secrets = server = None
    cluster: list[NatsServer] = []
    if nats_url is None:
        if open_nats:
            log.warning("NATS is OPEN: no credentials, no TLS (--open-nats); any local "
                        "process may publish any event and read any bucket")
        else:
            secrets = ensure_nats_secrets(home / "secrets")
        config_file = secrets.server_config if secrets else None
        if nats_cluster:
            cluster = home_cluster(home, nats_cluster, config_file=config_file)
        else:
            server = home_server(home, config_file=config_file)
    gateway_port = gateway_port or free_port()
    gateway = f"127.0.0.1:{gateway_port}"
    metrics_base = free_port()
    http_port = free_port()
    env = {
        "LMFORGE_GATEWAY_PORT": str(gateway_port),
        "LMFORGE_GATEWAY_HTTP_PORT": str(http_port),
        "LMFORGE_AUTOSCALER_GATEWAY_METRICS": ",".join(
            f"http://127.0.0.1:{metrics_base + i}/metrics" for i in range(4)),
        **env,
    }
    supervisor = Supervisor(home=home, nats_url=nats_url or "", nats_server=server, env=env,
                            nats_secrets=secrets, nats_cluster=cluster,
                            gateway=gateway, gateway_metrics_base=metrics_base,
                            http=f"http://127.0.0.1:{http_port}/v1")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await supervisor.run(stop)

    try:
        asyncio.run(main())
    except NatsUnreachable as exc:
        log.error("%s", exc)
        return 1
    finally:
        for node in [server, *cluster]:
            if node is not None:
                node.stop()
        state_file(home).unlink(missing_ok=True)
    return 0


def start_detached(home: Path, argv: list[str], timeout_s: float = 120.0) -> dict[str, Any]:
    """Run `lmforge up` in the background and wait until every service is running."""
    home = home.resolve()
    (home / "logs").mkdir(parents=True, exist_ok=True)
    state_file(home).unlink(missing_ok=True)
    with (home / "logs" / "up.log").open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "lmforge.cli.main", *argv], stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"lmforge up exited with {process.returncode}; see "
                               f"{home / 'logs' / 'up.log'}")
        state = read_state(home)
        if state and all(s["state"] == "running" for s in state["services"].values()):
            return state
        time.sleep(0.3)
    raise TimeoutError(f"services not all running after {timeout_s:.0f}s; see {home / 'logs'}")


def stop(home: Path, timeout_s: float = 90.0) -> bool:
    state = read_state(home)
    if state is None:
        return False
    os.kill(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(state["pid"], 0)
        except OSError:
            return True
        time.sleep(0.2)
    os.kill(state["pid"], signal.SIGKILL)
    return True
