"""The process supervisor behind `lmforge up`.

Creates the JetStream streams first, then starts each service as its own
process (`python -m services.<module>`), as many replicas as the autoscaler
decided or an SRE pinned, restarts a process that dies (with backoff, so a
crash loop does not spin the CPU), and writes its state to
`<home>/run/supervisor.json` for `lmforge status`. On SIGTERM it stops the
services gracefully (the trainer checkpoints first), then NATS.

The state file, and with it the NATS URL, appears only once the streams
exist: a core NATS publish to a subject no stream captures is dropped without
an error, so a client that publishes the moment `status` shows the URL must
find its event kept. A service is `starting` until every replica consumes
(its process wrote its pid to LMFORGE_READY_FILE after subscribing), then
`running`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from lmforge.bus import ensure_streams
from lmforge.contracts import subjects
from lmforge.contracts.names import SERVICES, ServiceName
from lmforge.contracts.v1 import events_pb2 as ev

log = logging.getLogger("lmforge.supervisor")

SERVICE_MODULES: dict[ServiceName, str] = {
    ServiceName.DATA_PREP: "services.data_prep",
    ServiceName.SCHEDULER: "services.scheduler",
    ServiceName.TRAINER: "services.trainer",
    ServiceName.QUANTIZER: "services.quantizer",
    ServiceName.EXPORTER: "services.exporter",
    ServiceName.INFERENCE_GATEWAY: "services.inference_gateway",
    ServiceName.COST_AUTOSCALER: "services.cost_autoscaler",
}
"""The module each service runs as (`python -m <module>`)."""

SINGLETONS = frozenset({ServiceName.COST_AUTOSCALER})
"""Exactly one control loop; scaling the autoscaler would double its decisions."""


class NatsUnreachable(RuntimeError):
    """The supervisor could not reach NATS to create the streams."""


def state_file(home: Path) -> Path:
    return home.resolve() / "run" / "supervisor.json"


@dataclass
class Replica:
    service: ServiceName
    index: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    crash_streak: int = 0
    next_start: float = 0.0
    started_at: float = 0.0

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        """The pid of the running process, or None when there is none."""
        return self.process.pid if self.process is not None and self.alive() else None

    @property
    def ready_file(self) -> Path:
        return self.log_path.parent.parent / "run" / "ready" / f"{self.service}-{self.index}"

    def ready(self) -> bool:
        """Alive, and its current process said it consumes (wrote its pid)."""
        pid = self.pid
        if pid is None:
            return False
        try:
            return int(self.ready_file.read_text()) == pid
        except (OSError, ValueError):
            return False


def service_phase(*, desired: int, alive: int, ready: int) -> str:
    """What `lmforge status` calls a service with these replica counts.

    stopped: none wanted; running: every wanted replica consumes; restarting: a
    replica is down (exited, waiting out its backoff); starting: all are up but
    not all consume yet.
    """
    if desired == 0:
        return "stopped"
    if ready >= desired:
        return "running"
    if alive < desired:
        return "restarting"
    return "starting"


@dataclass
class ServiceState:
    name: ServiceName
    desired: int = 1
    pinned: bool = False
    replicas: list[Replica] = field(default_factory=list)


class Supervisor:
    def __init__(self, *, home: Path, nats_url: str, env: dict[str, str],
                 gateway: str, gateway_metrics_base: int,
                 services: Sequence[ServiceName] | None = None, http: str = "",
                 stop_grace_s: float = 60.0, nats_timeout_s: float = 30.0,
                 commands: Mapping[ServiceName, Sequence[str]] | None = None) -> None:
        self.home = home.resolve()
        self.nats_url = nats_url
        self.env = env
        self.gateway = gateway
        self.http = http
        self.gateway_metrics_base = gateway_metrics_base
        self.stop_grace_s = stop_grace_s
        self.nats_timeout_s = nats_timeout_s
        self.logs = self.home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        wanted = SERVICES if services is None else services
        self.services = {name: ServiceState(name) for name in wanted}
        self.commands: dict[ServiceName, list[str]] = {
            name: [sys.executable, "-m", SERVICE_MODULES[name]] for name in wanted}
        self.commands.update({name: list(command) for name, command in (commands or {}).items()})

    # -- processes ------------------------------------------------------------------

    def _spawn(self, replica: Replica) -> None:
        env = dict(os.environ)
        env.update(self.env)
        env.update({
            "LMFORGE_NATS_URL": self.nats_url,
            "LMFORGE_HOME": str(self.home),
            "LMFORGE_REPLICA": str(replica.index),
            "LMFORGE_READY_FILE": str(replica.ready_file),
            "OTEL_SERVICE_NAME": replica.service,
            "OMP_WAIT_POLICY": env.get("OMP_WAIT_POLICY", "PASSIVE"),
            "PYTHONUNBUFFERED": "1",
        })
        if replica.service == ServiceName.INFERENCE_GATEWAY:
            env["LMFORGE_METRICS_PORT"] = str(self.gateway_metrics_base + replica.index)
        replica.ready_file.unlink(missing_ok=True)
        with replica.log_path.open("ab") as out:
            # Its own process group: a terminal's Ctrl-C reaches the supervisor only,
            # which stops the services in order.
            process = subprocess.Popen(
                self.commands[replica.service], env=env, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, process_group=0,
            )
        replica.process = process
        replica.started_at = time.monotonic()
        log.info("started %s[%d] pid %d", replica.service, replica.index, process.pid)

    def reconcile(self) -> None:
        """Start, stop and restart processes until each service has its desired replicas."""
        now = time.monotonic()
        for state in self.services.values():
            while len(state.replicas) < state.desired:
                index = len(state.replicas)
                state.replicas.append(Replica(
                    state.name, index, self.logs / f"{state.name}-{index}.log"))
            while len(state.replicas) > state.desired:
                self._terminate(state.replicas.pop())
            for replica in state.replicas:
                if replica.alive():
                    if now - replica.started_at > 60:
                        replica.crash_streak = 0  # stable again: next crash restarts fast
                    continue
                if replica.process is not None and replica.next_start == 0.0:
                    code = replica.process.returncode
                    replica.restarts += 1
                    replica.crash_streak += 1
                    delay = min(30.0, 0.25 * 2 ** min(replica.crash_streak, 7))
                    replica.next_start = now + delay
                    log.warning("%s[%d] exited with %s; restarting in %.1fs", replica.service,
                                replica.index, code, delay)
                if now >= replica.next_start:
                    replica.next_start = 0.0
                    self._spawn(replica)

    def _terminate(self, replica: Replica) -> None:
        if replica.process is not None and replica.alive():
            replica.process.send_signal(signal.SIGTERM)

    # -- state for `lmforge status` ---------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        services = {}
        for state in self.services.values():
            pids = [pid for pid in (r.pid for r in state.replicas) if pid is not None]
            ready = sum(r.ready() for r in state.replicas)
            services[str(state.name)] = {
                "state": service_phase(desired=state.desired, alive=len(pids), ready=ready),
                "replicas": ready,
                "desired": state.desired,
                "pinned": state.pinned,
                "restarts": sum(r.restarts for r in state.replicas),
                "pids": pids,
            }
        return {"pid": os.getpid(), "nats_url": self.nats_url, "gateway": self.gateway,
                "openai_base_url": self.http,
                "home": str(self.home), "services": services, "updated": time.time()}

    def write_state(self) -> None:
        path = state_file(self.home)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot(), indent=1))
        tmp.replace(path)

    # -- scaling --------------------------------------------------------------------

    def apply(self, decided: ev.ScalingDecided) -> None:
        for scale in decided.services:
            try:
                state = self.services.get(ServiceName(scale.service))
            except ValueError:
                state = None  # a service this build does not know
            if state is None:
                continue
            # One control loop, always: never doubled, never scaled away.
            replicas = 1 if scale.service in SINGLETONS else scale.replicas
            if replicas != state.desired:
                log.info("scaling %s %d -> %d (%s)", scale.service, state.desired, replicas,
                         scale.reason)
            state.desired, state.pinned = replicas, scale.pinned

    async def _follow_decisions(self, nc: Client) -> None:
        """Apply the last scaling decision in the stream, then each new one."""
        with contextlib.suppress(Exception):
            last = await nc.jetstream().get_last_msg(subjects.STREAM,
                                                     subjects.SCALING_DECIDED.name)
            if last.data:
                self.apply(subjects.SCALING_DECIDED.decode(last.data))

        async def on_decision(msg: Msg) -> None:
            with contextlib.suppress(Exception):
                self.apply(subjects.SCALING_DECIDED.decode(msg.data))

        await nc.subscribe(subjects.SCALING_DECIDED.name, cb=on_decision)

    # -- main loop ------------------------------------------------------------------

    async def connect(self) -> Client:
        """Connect to NATS (trying for `nats_timeout_s`) and create the streams."""
        async def on_error(exc: Exception) -> None:
            log.warning("NATS at %s: %s", self.nats_url, exc or type(exc).__name__)

        try:
            nc = await asyncio.wait_for(
                nats.connect(self.nats_url.split(","), name="supervisor", connect_timeout=2,
                             max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                             error_cb=on_error),
                timeout=self.nats_timeout_s)
        except (TimeoutError, nats.errors.NoServersError, OSError) as exc:
            raise NatsUnreachable(f"cannot reach NATS at {self.nats_url} within "
                                  f"{self.nats_timeout_s:.0f}s") from exc
        try:
            await ensure_streams(nc.jetstream())
        except BaseException:
            await nc.close()
            raise
        return nc

    async def run(self, stop: asyncio.Event) -> None:
        """Streams first, then the services; until `stop`, then stop them in order."""
        nc = await self.connect()
        log.info("streams ready on %s", self.nats_url)
        try:
            await self._follow_decisions(nc)
            while not stop.is_set():
                self.reconcile()
                self.write_state()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=0.5)
        finally:
            await self.shutdown()
            with contextlib.suppress(Exception):
                await nc.close()

    async def shutdown(self) -> None:
        replicas = [r for s in self.services.values() for r in s.replicas if r.alive()]
        for replica in replicas:
            self._terminate(replica)
        deadline = time.monotonic() + self.stop_grace_s
        while any(r.alive() for r in replicas) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        for replica in replicas:
            if replica.process is not None and replica.alive():
                log.warning("%s[%d] did not stop in %.0fs; killing", replica.service,
                            replica.index, self.stop_grace_s)
                replica.process.kill()
                replica.process.wait()
        for state in self.services.values():
            state.desired = 0
        self.write_state()
