"""Gateway replicas as the supervisor runs them, and clients that count what they hear.

Used by the replica fault tests (test_gateway_replicas.py) and runnable alone to
measure a scale-up and a kill -9 under a request loop, printing JSON:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m tests.services.inference_gateway.gateway_replicas \
        MODEL_DIR   # a trained tiny model (a Hugging Face directory)

Each replica is `python -m services.inference_gateway` with the environment the
supervisor gives it (its replica index, a ready file), sharing the gRPC and
HTTP ports with the others through SO_REUSEPORT. Every client request opens a
new connection (its own subchannel pool), so the kernel spreads requests over
every replica that listens, as it does for separate clients.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc

from lmforge.artifacts import ArtifactStore, StoredArtifact
from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.contracts.v1 import generate_pb2, generate_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[3]
MODEL = "fortune"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def store_export(store: ArtifactStore, model_dir: Path,
                 export_json: dict[str, object] | None = None) -> StoredArtifact:
    """The trained model as the exporter stores it: a directory with hf/ inside and the
    export.json the gateway reads (fp32 served weights unless `export_json` says)."""
    staging = store.scratch_dir("export-")
    shutil.copytree(model_dir, staging / "hf", ignore=shutil.ignore_patterns("MANIFEST.json"))
    (staging / "export.json").write_text(json.dumps(
        export_json or {"served_weights": "fp32", "served_reason": ""}))
    return store.put_dir(staging, move=True)


def exported(run_id: str, version: str, export: StoredArtifact) -> ev.ModelExported:
    return ev.ModelExported(run_id=run_id, model_name=MODEL, version=version,
                            export=ev.ArtifactRef(digest=export.digest,
                                                  size_bytes=export.size_bytes))


@dataclass
class GatewayReplica:
    """One `python -m services.inference_gateway` process."""

    index: int
    home: Path
    nats_url: str
    grpc_port: int
    http_port: int
    extra_env: dict[str, str] = field(default_factory=dict)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def ready_file(self) -> Path:
        return self.home / "ready" / f"gateway-{self.index}"

    @property
    def log_path(self) -> Path:
        return self.home / "logs" / f"gateway-{self.index}.log"

    def start(self) -> GatewayReplica:
        self.ready_file.unlink(missing_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "LMFORGE_NATS_URL": self.nats_url, "LMFORGE_HOME": str(self.home),
               "LMFORGE_REPLICA": str(self.index), "LMFORGE_READY_FILE": str(self.ready_file),
               "LMFORGE_METRICS_PORT": str(self.metrics_port),
               "LMFORGE_GATEWAY_PORT": str(self.grpc_port),
               "LMFORGE_GATEWAY_HTTP_PORT": str(self.http_port),
               "LMFORGE_GATEWAY_THREADS": "1", "LMFORGE_GATEWAY_MAX_BATCH": "8",
               "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1", **self.extra_env}
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.inference_gateway"], cwd=os.getcwd(),
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                process_group=0)
        return self

    async def wait_ready(self, timeout: float = 120.0) -> None:
        """Until the replica consumes (it writes its ready file then)."""
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway {self.index} exited with {self.process.returncode}"
                                   f":\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway {self.index} not ready:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.1)

    async def wait_serving(self, timeout: float = 180.0) -> None:
        """Until the replica consumes and has restored the deployed models (a replica that
        found another on the shared ports joins them only then)."""
        deadline = time.monotonic() + timeout
        await self.wait_ready(timeout)
        while self.metric("lmforge_gateway_restoring") != 0.0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway {self.index} still restoring:\n"
                                   f"{self.log()[-3000:]}")
            await asyncio.sleep(0.1)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not stop. Returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _metrics(self) -> str:
        """This replica's /metrics ("" when it does not answer)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                        timeout=5) as response:
                return str(response.read().decode())
        except OSError:
            return ""

    def metric(self, name: str) -> float | None:
        """The value of a metric of this replica, unlabelled or with one series (a label
        naming the replica); None when not shown."""
        for line in self._metrics().splitlines():
            if line.startswith((f"{name} ", f"{name}{{")):
                return float(line.rsplit(" ", 1)[1])
        return None

    def requests_ok(self) -> float:
        """OK requests this replica counted (its /metrics), 0 when it does not answer."""
        return sum(float(line.rsplit(" ", 1)[1]) for line in self._metrics().splitlines()
                   if line.startswith("lmforge_gateway_requests_total{")
                   and 'code="OK"' in line)


def processes_with_home(home: Path) -> list[int]:
    """Pids of live (not zombie) processes started with LMFORGE_HOME=home: a gateway and
    its engine processes (spawned children inherit the environment)."""
    wanted = f"LMFORGE_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if wanted in environ.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


def engine_processes(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of the engine processes `pid` started (multiprocessing spawn children,
    not its resource tracker); state Z: a zombie nobody reaped."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    stat = Path(f"/proc/{child}/stat").read_text()
                    cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                    if b"resource_tracker" not in cmdline:
                        found.append((int(child), stat.rsplit(")", 1)[1].split()[0]))
    return found


@dataclass
class RequestLoop:
    """Clients sending small requests, each on a new connection, counting the outcomes:
    gRPC status names for Generate, `http <status>` or `http disconnected` for HTTP."""

    grpc_port: int
    http_port: int
    grpc_clients: int = 3
    http_clients: int = 1
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    details: dict[str, str] = field(default_factory=dict)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> RequestLoop:
        self._tasks = [asyncio.create_task(self._grpc_client())
                       for _ in range(self.grpc_clients)]
        self._tasks += [asyncio.create_task(self._http_client())
                        for _ in range(self.http_clients)]
        return self

    async def stop(self) -> collections.Counter[str]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.outcomes

    def phase(self) -> collections.Counter[str]:
        """The outcomes so far (copy), to subtract from a later one."""
        return collections.Counter(self.outcomes)

    def _count(self, outcome: str, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        if detail:
            self.details.setdefault(outcome, detail)

    async def _grpc_client(self) -> None:
        request = generate_pb2.GenerateRequest(model=MODEL, prompt="The wise", max_new_tokens=2)
        while not self._stop.is_set():
            # A channel of its own (not grpc's global subchannel pool): a new connection.
            async with grpc.aio.insecure_channel(
                    f"127.0.0.1:{self.grpc_port}",
                    options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                stub = generate_pb2_grpc.GeneratorStub(channel)
                try:
                    async for _ in stub.Generate(request, timeout=15):
                        pass
                    self._count("OK")
                except grpc.aio.AioRpcError as exc:
                    self._count(exc.code().name, exc.details() or "")
                    await asyncio.sleep(0.05)

    async def _http_client(self) -> None:
        body = {"model": MODEL, "prompt": "The wise", "max_tokens": 2}
        url = f"http://127.0.0.1:{self.http_port}/v1/completions"
        timeout = aiohttp.ClientTimeout(total=15)
        while not self._stop.is_set():
            async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(force_close=True),
                    timeout=timeout) as session:
                try:
                    async with session.post(url, json=body) as response:
                        text = await response.text()
                        self._count(f"http {response.status}",
                                    "" if response.status == 200 else text[:300])
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self._count("http disconnected", repr(exc)[:300])
                    await asyncio.sleep(0.05)


def difference(after: collections.Counter[str], before: collections.Counter[str]
               ) -> dict[str, int]:
    return {k: v for k, v in sorted((after - before).items())}


async def scale_up_and_kill(home: Path, nats_url: str, export: StoredArtifact, *,
                            settle_s: float = 2.0) -> dict[str, object]:
    """The fault scenario: replica 0 serves a deployed model under a request loop; replica 1
    starts (a scale-up); replica 0 is killed with SIGKILL and started again (as the
    supervisor does). Returns the outcomes of each phase and what each replica served."""
    grpc_port, http_port = free_port(), free_port()
    first = GatewayReplica(0, home, nats_url, grpc_port, http_port).start()
    second = GatewayReplica(1, home, nats_url, grpc_port, http_port)
    replicas = [first, second]
    try:
        await first.wait_ready()
        await publish_export(nats_url, exported("run-a", "v1", export))
        loop = RequestLoop(grpc_port, http_port).start()
        await asyncio.sleep(settle_s)
        before = loop.phase()

        started = time.monotonic()
        second.start()
        await second.wait_ready()
        scale_up_ready_s = time.monotonic() - started
        await second.wait_serving()
        scale_up_serving_s = time.monotonic() - started
        await asyncio.sleep(settle_s)
        after_scale_up = loop.phase()
        second_ok = second.requests_ok()

        first.kill()
        killed_at = time.monotonic()
        await asyncio.sleep(settle_s)  # the supervisor restarts a crashed replica in ~2 s
        first.start()
        await first.wait_ready()
        restart_ready_s = time.monotonic() - killed_at
        await first.wait_serving()
        restart_serving_s = time.monotonic() - killed_at
        await asyncio.sleep(settle_s)
        first_ok_after_restart = first.requests_ok()
        await loop.stop()
        return {
            "before": difference(before, collections.Counter()),
            "scale_up": difference(after_scale_up, before),
            "kill_and_restart": difference(loop.outcomes, after_scale_up),
            "total": difference(loop.outcomes, collections.Counter()),
            "details": loop.details,
            "ok_served_by_new_replica": second_ok,
            "ok_served_by_restarted_replica": first_ok_after_restart,
            "scale_up_ready_s": round(scale_up_ready_s, 1),
            "scale_up_serving_s": round(scale_up_serving_s, 1),
            "restart_ready_s": round(restart_ready_s, 1),
            "restart_serving_s": round(restart_serving_s, 1),
        }
    finally:
        for replica in replicas:
            replica.stop()


async def kill_the_only_replica(home: Path, nats_url: str, export: StoredArtifact, *,
                                settle_s: float = 2.0) -> dict[str, object]:
    """One replica serving under a request loop is killed with SIGKILL and started again:
    while none is up, clients can only hear UNAVAILABLE (nothing listens); once it is
    back it must serve, not answer NOT_FOUND while it reloads the model (it answers
    UNAVAILABLE, "loading", until then)."""
    grpc_port, http_port = free_port(), free_port()
    only = GatewayReplica(0, home, nats_url, grpc_port, http_port).start()
    try:
        await only.wait_ready()
        await publish_export(nats_url, exported("run-a", "v1", export))
        loop = RequestLoop(grpc_port, http_port).start()
        await asyncio.sleep(settle_s)
        before = loop.phase()
        only.kill()
        killed_at = time.monotonic()
        await asyncio.sleep(settle_s)
        only.start()
        await only.wait_ready()
        restart_ready_s = time.monotonic() - killed_at
        await only.wait_serving()
        restart_serving_s = time.monotonic() - killed_at
        await asyncio.sleep(settle_s)
        await loop.stop()
        return {"before": difference(before, collections.Counter()),
                "kill_and_restart": difference(loop.outcomes, before),
                "details": loop.details, "restart_ready_s": round(restart_ready_s, 1),
                "restart_serving_s": round(restart_serving_s, 1)}
    finally:
        only.stop()


async def publish_export(nats_url: str, event: ev.ModelExported) -> None:
    """Publish `event` and wait for its model.deployed."""
    from tests.helpers import publish, wait_for_events

    await publish(nats_url, event, msg_id=f"{event.run_id}:exported")
    await wait_for_events(nats_url, subjects.MODEL_DEPLOYED, 1, run_id=event.run_id,
                          timeout=120)


def left_running(home: Path, timeout: float = 10.0) -> list[int]:
    """Processes of `home` still running `timeout` s after its gateways stopped (engine
    processes of a killed gateway stop when its end of their pipe closes)."""
    deadline = time.monotonic() + timeout
    while (found := processes_with_home(home)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def main() -> None:
    """Measure the fault scenario once on a fresh nats-server and a freshly trained model."""
    import tempfile

    from lmforge.runtime.nats_server import NatsServer

    model_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if model_dir is None:
            raise SystemExit("usage: gateway_replicas.py MODEL_DIR (a trained tiny model)")
        store = ArtifactStore(work / "home" / "artifacts")
        export = store_export(store, model_dir)
        figures = {}
        for name, scenario in (("scale_up_then_kill", scale_up_and_kill),
                               ("kill_the_only_replica", kill_the_only_replica)):
            nats_dir = work / name
            server = NatsServer(store_dir=nats_dir / "nats", log_file=nats_dir / "nats.log")
            server.start()
            try:
                figures[name] = asyncio.run(scenario(work / "home", server.url, export))
                figures[name]["left_running"] = left_running(work / "home")
            finally:
                server.stop()
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
