"""The process supervisor behind `lmforge up`.

Creates the JetStream streams first, then starts each service as its own
process (`python -m services.<module>`), as many replicas as the autoscaler
decided or an SRE pinned, restarts a process that dies (with backoff, so a
crash loop does not spin the CPU), and writes its state to
`<home>/run/supervisor.json` for `lmforge status`. Every replica serves /metrics on
a port given here and kept across restarts (`scrape_targets`), listed by `status`
and written as a Prometheus target file. On SIGTERM it stops the
services gracefully (the trainer checkpoints first), then NATS.

The state file, and with it the NATS URL, appears only once the streams
exist: a core NATS publish to a subject no stream captures is dropped without
an error, so a client that publishes the moment `status` shows the URL must
find its event kept. A service is `starting` until every replica consumes
(its process wrote its pid to LMFORGE_READY_FILE after subscribing), then
`running`.

The embedded nats-server is watched like a service: when it dies (a kill -9,
an OOM kill) it is restarted on the same port and the same store, with the
same backoff, and its restarts are counted in the state file. While NATS is
down `status` says so, and services whose processes run but cannot consume
are `disconnected` rather than `running`. Clients and services keep their URL
and reconnect by themselves; the streams and durable consumers are in the
store, so nothing is lost.

With NATS security (`nats_secrets`, the default of `lmforge up`), the
supervisor connects as `admin` and creates every stream and key-value bucket,
each service process gets its own credential file and the CA
(LMFORGE_NATS_CREDS, LMFORGE_NATS_CA), and the state file names the `client`
and `admin` credentials for the CLI.
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
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from lmforge.bus import ensure_kv, ensure_streams
from lmforge.contracts import subjects
from lmforge.contracts.names import SERVICES, Bucket, ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.runtime.nats_server import NatsServer
from lmforge.runtime.scrape_targets import MetricsPorts, metrics_url, targets_file, write_targets
from lmforge.security.nats_connect import NatsAuth
from lmforge.security.nats_roles import ADMIN, CLIENT
from lmforge.security.nats_secrets import NatsSecrets

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


def crash_backoff_s(crash_streak: int) -> float:
    """Seconds to wait before restarting a process that crashed `crash_streak` times in a
    row: 0.5 s after one crash, doubling to 30 s, so a crash loop does not spin the CPU."""
    return min(30.0, 0.25 * 2 ** min(crash_streak, 7))


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


def service_phase(*, desired: int, alive: int, ready: int, nats_up: bool = True) -> str:
    """What `lmforge status` calls a service with these replica counts.

    stopped: none wanted; restarting: a replica is down (exited, waiting out its
    backoff); disconnected: its processes run but NATS is down, so nothing
    consumes; running: every wanted replica consumes; starting: all are up but
    not all consume yet.
    """
    if desired == 0:
        return "stopped"
    if alive < desired:
        return "restarting"
    if not nats_up:
        return "disconnected"
    if ready >= desired:
        return "running"
    return "starting"


@dataclass
class EmbeddedNats:
    """The nats-server `lmforge up` started, restarted like a service when it dies.

    Always on its own port and store: the services, the CLI and anyone holding
    the URL reconnect to the same address, and the streams, consumers and
    stage records are all in the store.
    """

    server: NatsServer
    restarts: int = 0
    crash_streak: int = 0
    next_start: float = 0.0
    started_at: float = 0.0

    def watch(self, now: float) -> None:
        """Restart the server after its backoff if it exited."""
        if self.server.alive():
            if now - self.started_at > 60:
                self.crash_streak = 0  # stable again: next crash restarts fast
            return
        if self.next_start == 0.0:
            process = self.server.process
            self.restarts += 1
            self.crash_streak += 1
            delay = crash_backoff_s(self.crash_streak)
            self.next_start = now + delay
            log.warning("nats-server exited with %s; restarting it on %s (store %s) in %.1fs",
                        process.returncode if process else None, self.server.url,
                        self.server.store_dir, delay)
        if now >= self.next_start:
            self.next_start = 0.0
            self.started_at = now
            try:
                self.server.spawn()
            except OSError as exc:  # the binary went missing: try again after the backoff
                log.error("cannot start nats-server: %s", exc)
                return
            log.info("nats-server restarted on %s, pid %d", self.server.url,
                     self.server.process.pid if self.server.process else 0)

    def status(self, *, connected: bool) -> dict[str, Any]:
        alive = self.server.alive()
        state = "running" if alive and connected else "starting" if alive else "down"
        return {"state": state, "embedded": True, "restarts": self.restarts,
                "pid": self.server.process.pid if alive and self.server.process else None,
                "store": str(self.server.store_dir)}


@dataclass
class ServiceState:
    name: ServiceName
    desired: int = 1
    pinned: bool = False
    replicas: list[Replica] = field(default_factory=list)
    load_unknown: bool = False
    """The latest scaling decision could not observe this service's load and held it:
    `status` says so, since replicas held on a failed scrape look healthy otherwise."""
    scaling_reason: str = ""
    """Why the latest decision chose `desired` (the autoscaler's own words)."""


class Supervisor:
    def __init__(self, *, home: Path, nats_url: str = "", env: dict[str, str],
                 gateway: str, gateway_metrics_base: int,
                 services: Sequence[ServiceName] | None = None, http: str = "",
                 stop_grace_s: float = 60.0, nats_timeout_s: float = 30.0,
                 commands: Mapping[ServiceName, Sequence[str]] | None = None,
                 nats_server: NatsServer | None = None,
                 nats_secrets: NatsSecrets | None = None,
                 nats_cluster: Sequence[NatsServer] = ()) -> None:
        """`nats_server`: the embedded server to start first, watch and stop last (its URL
        is then the NATS URL); `nats_cluster`: the nodes of an embedded JetStream cluster,
        each watched the same way, streams and buckets at one replica per node; without
        either, `nats_url` is a server run by someone else. `nats_secrets`: the
        credentials and CA of a secured NATS (one per service)."""
        self.home = home.resolve()
        self.nats_secrets = nats_secrets
        servers = [nats_server] if nats_server is not None else list(nats_cluster)
        self.nats_nodes = [EmbeddedNats(server) for server in servers]
        self.nats = self.nats_nodes[0] if self.nats_nodes else None
        self.stream_replicas = len(self.nats_nodes) if len(self.nats_nodes) > 1 else 1
        self._nats_url = nats_url
        self.nats_connected = False
        """The supervisor's own connection is up (kept by the NATS client's callbacks)."""
        self.env = env
        self.gateway = gateway
        self.http = http
        self.gateway_metrics_base = gateway_metrics_base
        self.metrics_ports = MetricsPorts(
            {ServiceName.INFERENCE_GATEWAY: gateway_metrics_base} if gateway_metrics_base
            else {})
        """Every replica's /metrics port, kept across its restarts (`status` lists them)."""
        self.stop_grace_s = stop_grace_s
        self.nats_timeout_s = nats_timeout_s
        self.retiring: list[tuple[Replica, float]] = []
        """Replicas scaled away: sent SIGTERM, reaped by `reap_retired` (killed past the grace)."""
        self.logs = self.home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        wanted = SERVICES if services is None else services
        self.services = {name: ServiceState(name) for name in wanted}
        self.commands: dict[ServiceName, list[str]] = {
            name: [sys.executable, "-m", SERVICE_MODULES[name]] for name in wanted}
        self.commands.update({name: list(command) for name, command in (commands or {}).items()})

    @property
    def nats_url(self) -> str:
        if self.nats_nodes:
            return ",".join(node.server.url for node in self.nats_nodes)
        return self._nats_url

    def auth_for(self, role: str) -> NatsAuth:
        """The credential and CA of `role` (a service, `client`, `admin`); none if open."""
        if self.nats_secrets is None:
            return NatsAuth()
        return NatsAuth.from_files(self.nats_secrets.credential_path(role),
                                   self.nats_secrets.tls.ca)

    def nats_env(self, service: ServiceName) -> dict[str, str]:
        """LMFORGE_NATS_CREDS and LMFORGE_NATS_CA of `service`'s processes."""
        if self.nats_secrets is None:
            return {}
        return {"LMFORGE_NATS_CREDS": str(self.nats_secrets.credential_path(service)),
                "LMFORGE_NATS_CA": str(self.nats_secrets.tls.ca)}

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
            **self.nats_env(replica.service),
        })
        env["LMFORGE_METRICS_PORT"] = str(self.metrics_ports.port(replica.service,
                                                                   replica.index))
        if self.stream_replicas > 1:
            env["LMFORGE_STREAM_REPLICAS"] = str(self.stream_replicas)
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
                retired = state.replicas.pop()
                if retired.alive():
                    self._terminate(retired)
                    self.retiring.append((retired, now + self.stop_grace_s))
            for replica in state.replicas:
                if replica.alive():
                    if now - replica.started_at > 60:
                        replica.crash_streak = 0  # stable again: next crash restarts fast
                    continue
                if replica.process is not None and replica.next_start == 0.0:
                    code = replica.process.returncode
                    replica.restarts += 1
                    replica.crash_streak += 1
                    delay = crash_backoff_s(replica.crash_streak)
                    replica.next_start = now + delay
                    log.warning("%s[%d] exited with %s; restarting in %.1fs", replica.service,
                                replica.index, code, delay)
                if now >= replica.next_start:
                    replica.next_start = 0.0
                    self._spawn(replica)

    def reap_retired(self) -> None:
        """Wait on the replicas scaled away that have exited (no zombie stays behind);
        SIGKILL one still running past its grace period."""
        now = time.monotonic()
        still: list[tuple[Replica, float]] = []
        for replica, deadline in self.retiring:
            process = replica.process
            if process is None or process.poll() is not None:
                continue  # poll() reaped it
            if now >= deadline:
                log.warning("%s[%d] did not stop in %.0fs after scale-down; killing",
                            replica.service, replica.index, self.stop_grace_s)
                process.kill()
                process.wait()
                continue
            still.append((replica, deadline))
        self.retiring = still

    def _terminate(self, replica: Replica) -> None:
        if replica.process is not None and replica.alive():
            replica.process.send_signal(signal.SIGTERM)

    # -- state for `lmforge status` ---------------------------------------------------

    def nats_status(self) -> dict[str, Any]:
        """NATS as `lmforge status` shows it: running, starting (the embedded server's
        process is up, not answering yet) or down; restarts of the embedded server."""
        if len(self.nats_nodes) > 1:
            nodes = [{"name": node.server.server_name, "url": node.server.url,
                      **node.status(connected=self.nats_connected)}
                     for node in self.nats_nodes]
            status = {**nodes[0], "state": "running" if self.nats_connected else "down",
                      "restarts": sum(n["restarts"] for n in nodes), "nodes": nodes}
        elif self.nats is not None:
            status = self.nats.status(connected=self.nats_connected)
        else:
            status = {"state": "running" if self.nats_connected else "down",
                      "embedded": False, "restarts": 0, "pid": None, "store": None}
        secured = self.nats_secrets is not None
        status["security"] = "tls+credentials" if secured else "open"
        if secured and self.nats_secrets is not None:
            status["client_creds"] = str(self.nats_secrets.credential_path(CLIENT))
            status["admin_creds"] = str(self.nats_secrets.credential_path(ADMIN))
            status["ca"] = str(self.nats_secrets.tls.ca)
        return {"url": self.nats_url, **status}

    def snapshot(self) -> dict[str, Any]:
        nats_status = self.nats_status()
        nats_up = nats_status["state"] == "running"
        services = {}
        for state in self.services.values():
            pids = [pid for pid in (r.pid for r in state.replicas) if pid is not None]
            ready = sum(r.ready() for r in state.replicas)
            services[str(state.name)] = {
                "state": service_phase(desired=state.desired, alive=len(pids), ready=ready,
                                       nats_up=nats_up),
                "replicas": ready,
                "desired": state.desired,
                "pinned": state.pinned,
                "load_unknown": state.load_unknown,
                "scaling_reason": state.scaling_reason,
                "restarts": sum(r.restarts for r in state.replicas),
                "pids": pids,
            }
            services[str(state.name)]["metrics_urls"] = [
                metrics_url(port) for port in self._replica_ports(state)]
        return {"pid": os.getpid(), "nats_url": self.nats_url, "nats": nats_status,
                "gateway": self.gateway, "openai_base_url": self.http,
                "home": str(self.home), "services": services, "updated": time.time()}

    def _replica_ports(self, state: ServiceState) -> list[int]:
        """The metrics ports of a service's replicas that have been started."""
        ports = (self.metrics_ports.known(state.name, r.index) for r in state.replicas)
        return [port for port in ports if port is not None]

    def write_state(self) -> None:
        path = state_file(self.home)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot(), indent=1))
        tmp.replace(path)
        write_targets(targets_file(self.home), [
            (state.name, r.index, port) for state in self.services.values()
            for r in state.replicas
            if r.alive() and (port := self.metrics_ports.known(state.name, r.index))])

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
            state.load_unknown, state.scaling_reason = scale.load_unknown, scale.reason

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
            # Every failed reconnect lands here, twice a second while NATS is down; the
            # change of state is logged once, by the callbacks below.
            log.debug("NATS at %s: %s", self.nats_url, exc or type(exc).__name__)

        async def on_disconnected() -> None:
            if self.nats_connected:
                log.warning("lost the connection to NATS at %s", self.nats_url)
            self.nats_connected = False

        async def on_reconnected() -> None:
            self.nats_connected = True
            log.warning("reconnected to NATS at %s", self.nats_url)

        try:
            nc = await asyncio.wait_for(
                nats.connect(self.nats_url.split(","), name="supervisor", connect_timeout=2,
                             max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                             error_cb=on_error, disconnected_cb=on_disconnected,
                             reconnected_cb=on_reconnected,
                             **self.auth_for(ADMIN).connect_options()),
                timeout=self.nats_timeout_s)
        except (TimeoutError, nats.errors.NoServersError, OSError) as exc:
            raise NatsUnreachable(f"cannot reach NATS at {self.nats_url} within "
                                  f"{self.nats_timeout_s:.0f}s") from exc
        try:
            await self._ensure_streams(nc)
        except BaseException:
            await nc.close()
            raise
        self.nats_connected = nc.is_connected
        return nc

    async def _ensure_streams(self, nc: Client) -> None:
        """Create the streams and every bucket (with NATS security on, services may use
        them, not make them); a fresh cluster answers "JetStream system temporarily
        unavailable" until it has elected its meta leader, so that is waited out."""
        deadline = time.monotonic() + self.nats_timeout_s
        while True:
            try:
                await ensure_streams(nc.jetstream(), replicas=self.stream_replicas)
                for bucket in Bucket:
                    await ensure_kv(nc.jetstream(), bucket, replicas=self.stream_replicas)
                return
            except (nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError,
                    nats.js.errors.APIError) as exc:
                if self.stream_replicas == 1 or time.monotonic() > deadline:
                    raise NatsUnreachable(f"NATS at {self.nats_url} did not create the "
                                          f"streams: {exc}") from exc
                await asyncio.sleep(0.5)

    async def start_nats(self) -> None:
        """Start the embedded nats-server(s) that are not running, together (the nodes of
        a cluster wait for each other's routes)."""
        idle = [node for node in self.nats_nodes if not node.server.alive()]
        try:
            await asyncio.gather(*(asyncio.to_thread(node.server.start) for node in idle))
        except (OSError, RuntimeError, TimeoutError) as exc:
            raise NatsUnreachable(f"cannot start the embedded nats-server: {exc}") from exc
        for node in idle:
            node.started_at = time.monotonic()
            log.info("embedded nats-server %s listening on %s (JetStream store %s)",
                     node.server.server_name, node.server.url, node.server.store_dir)

    def watch_nats(self) -> None:
        for node in self.nats_nodes:
            node.watch(time.monotonic())

    async def run(self, stop: asyncio.Event) -> None:
        """NATS and the streams first, then the services; until `stop`, then stop them
        in order: the services (the trainer checkpoints and hands back), NATS last."""
        try:
            await self.start_nats()
            nc = await self.connect()
            log.info("streams ready on %s", self.nats_url)
            try:
                await self._follow_decisions(nc)
                while not stop.is_set():
                    self.watch_nats()
                    self.reconcile()
                    self.reap_retired()
                    self.write_state()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=0.5)
            finally:
                await self.shutdown()
                self.nats_connected = False  # closing it ourselves is no loss to report
                with contextlib.suppress(Exception):
                    await nc.close()
        finally:
            for node in self.nats_nodes:
                if node.server.alive():
                    log.info("services stopped; stopping the nats-server %s",
                             node.server.server_name)
                    node.server.stop()

    async def shutdown(self) -> None:
        """Stop the services (SIGTERM, then SIGKILL after `stop_grace_s`). NATS is kept
        up meanwhile, restarted if it dies, so a trainer can still hand its job back."""
        replicas = [r for s in self.services.values() for r in s.replicas if r.alive()]
        replicas += [r for r, _ in self.retiring if r.alive()]
        self.retiring = []
        for replica in replicas:
            self._terminate(replica)
        deadline = time.monotonic() + self.stop_grace_s
        while any(r.alive() for r in replicas) and time.monotonic() < deadline:
            self.watch_nats()
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
