"""The process supervisor behind `lmforge up`.

Starts each service as its own process (`python -m services.<module>`), as
many replicas as the autoscaler decided or an SRE pinned, restarts a process
that dies (with backoff, so a crash loop does not spin the CPU), and writes
its state to `<home>/run/supervisor.json` for `lmforge status`. On SIGTERM
it stops the services gracefully (the trainer checkpoints first), then NATS.
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
from dataclasses import dataclass, field
from pathlib import Path

import nats

from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev

log = logging.getLogger("lmforge.supervisor")

SERVICE_MODULES: dict[str, str] = {
    "data-prep": "services.data_prep",
    "scheduler": "services.scheduler",
    "trainer": "services.trainer",
    "quantizer": "services.quantizer",
    "exporter": "services.exporter",
    "inference-gateway": "services.inference_gateway",
    "cost-autoscaler": "services.cost_autoscaler",
}
# Exactly one control loop; scaling the autoscaler would double its decisions.
SINGLETONS = {"cost-autoscaler"}


def state_file(home: Path) -> Path:
    return home.resolve() / "run" / "supervisor.json"


@dataclass
class Replica:
    service: str
    index: int
    log_path: Path
    process: subprocess.Popen | None = None
    restarts: int = 0
    crash_streak: int = 0
    next_start: float = 0.0
    started_at: float = 0.0

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def ready_file(self) -> Path:
        return self.log_path.parent.parent / "run" / "ready" / f"{self.service}-{self.index}"

    def ready(self) -> bool:
        """Alive, and its current process said it consumes (wrote its pid)."""
        if not self.alive():
            return False
        try:
            return int(self.ready_file.read_text()) == self.process.pid
        except (OSError, ValueError):
            return False


@dataclass
class ServiceState:
    name: str
    desired: int = 1
    pinned: bool = False
    replicas: list[Replica] = field(default_factory=list)


class Supervisor:
    def __init__(self, *, home: Path, nats_url: str, env: dict[str, str],
                 gateway: str, gateway_metrics_base: int, services: list[str] | None = None,
                 http: str = "",
                 stop_grace_s: float = 60.0) -> None:
        self.home = home.resolve()
        self.nats_url = nats_url
        self.env = env
        self.gateway = gateway
        self.http = http
        self.gateway_metrics_base = gateway_metrics_base
        self.stop_grace_s = stop_grace_s
        self.logs = self.home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.services = {name: ServiceState(name) for name in (services or SERVICE_MODULES)}

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
        if replica.service == "inference-gateway":
            env["LMFORGE_METRICS_PORT"] = str(self.gateway_metrics_base + replica.index)
        replica.ready_file.unlink(missing_ok=True)
        out = replica.log_path.open("ab")
        replica.process = subprocess.Popen(
            [sys.executable, "-m", SERVICE_MODULES[replica.service]],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        out.close()
        replica.started_at = time.monotonic()
        log.info("started %s[%d] pid %d", replica.service, replica.index, replica.process.pid)

    def _reconcile(self) -> None:
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
        if replica.alive():
            replica.process.send_signal(signal.SIGTERM)

    # -- state for `lmforge status` ---------------------------------------------------

    def snapshot(self) -> dict:
        services = {}
        for state in self.services.values():
            alive = sum(r.alive() for r in state.replicas)
            ready = sum(r.ready() for r in state.replicas)
            if state.desired == 0:
                phase = "stopped"
            elif ready == state.desired:
                phase = "running"
            elif alive == state.desired:
                phase = "starting"
            else:
                phase = "restarting"
            services[state.name] = {
                "state": phase,
                "replicas": ready,
                "desired": state.desired,
                "pinned": state.pinned,
                "restarts": sum(r.restarts for r in state.replicas),
                "pids": [r.process.pid for r in state.replicas if r.alive()],
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
            state = self.services.get(scale.service)
            if state is None:
                continue
            # One control loop, always: never doubled, never scaled away.
            replicas = 1 if scale.service in SINGLETONS else scale.replicas
            if replicas != state.desired:
                log.info("scaling %s %d -> %d (%s)", scale.service, state.desired, replicas,
                         scale.reason)
            state.desired, state.pinned = replicas, scale.pinned

    async def _follow_decisions(self) -> None:
        nc = await nats.connect(self.nats_url, max_reconnect_attempts=-1, name="supervisor")
        js = nc.jetstream()
        with contextlib.suppress(Exception):
            last = await js.get_last_msg(subjects.STREAM, subjects.SCALING_DECIDED.name)
            self.apply(subjects.SCALING_DECIDED.decode(last.data))

        async def on_decision(msg) -> None:
            with contextlib.suppress(Exception):
                self.apply(subjects.SCALING_DECIDED.decode(msg.data))

        await nc.subscribe(subjects.SCALING_DECIDED.name, cb=on_decision)
        try:
            await asyncio.Event().wait()
        finally:
            await nc.close()

    # -- main loop ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        follower = asyncio.create_task(self._follow_decisions())
        try:
            while not stop.is_set():
                self._reconcile()
                self.write_state()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=0.5)
        finally:
            follower.cancel()
            await self.shutdown()

    async def shutdown(self) -> None:
        replicas = [r for s in self.services.values() for r in s.replicas if r.alive()]
        for replica in replicas:
            replica.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        while any(r.alive() for r in replicas) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        for replica in replicas:
            if replica.alive():
                log.warning("%s[%d] did not stop in %.0fs; killing", replica.service,
                            replica.index, self.stop_grace_s)
                replica.process.kill()
        for state in self.services.values():
            state.desired = 0
        self.write_state()
