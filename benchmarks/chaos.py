"""The chaos suite: N full pipeline runs under `lmforge up`, a kill -9 in each.

    PYTHONPATH=libs:. python -m benchmarks.chaos --runs 20 --budget-s 3000 \
        --out benchmarks/results/chaos.json

One `lmforge up -d` system (the embedded nats-server, or with `--nats-cluster 3`
three of them) runs the whole time. A warm-up run without a fault measures how
long a run takes (D). Then each run publishes `dataset.ready` for its own slice
of the shipped fortunes (so no stage is replayed from the stage cache) and, at a
random moment in [0.05 D, 0.9 D], kill -9's one target: a service chosen at
random, or the nats-server itself (every target comes up in turn, in a random
order, so twenty runs hit each of the eight at least twice). The supervisor
restarts what was killed — the nats-server on the same port and store.

After each run it checks, from the stream, the key-value buckets, the
artifact store and the publishers' own journals
(`lmforge.runtime.publish_journal`):
- the run reached `model.deployed`, or failed exactly once with a reason;
- every stage published its output exactly once (one event per stage output
  in the stream *and* one publish call per output id in the journals: a second
  call is a stage whose work was done twice, hidden from the stream by the
  dedup window), every stage input of the run has its stage record, and every
  artifact the run's events name is in the store;
- no event was lost: every id a publisher saw acknowledged is in the stream or
  the dead letters;
- time to recover: from the kill until the target runs again and every
  service consumes.

Bounded in time: no run starts after `--budget-s`, and each run has a timeout.
It prints one JSON document; it never passes or fails on time. The reduced
version runs in CI as tests/chaos/test_chaos.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
from google.protobuf.message import Message

from lmforge.contracts import names, subjects
from lmforge.contracts.names import Bucket, Header, ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import payload_digest
from lmforge.runtime.publish_journal import JOURNAL_ENV, PublishJournal, read_journal

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "data" / "fortunes-sample.txt"
NATS_TARGET = "nats-server"
NATS_LEADER = "nats-stream-leader"
"""With `--nats-cluster 3`: the node that leads the event stream at the moment of the kill."""
PIPELINE_SERVICES = (ServiceName.DATA_PREP, ServiceName.SCHEDULER, ServiceName.TRAINER,
                     ServiceName.QUANTIZER, ServiceName.EXPORTER,
                     ServiceName.INFERENCE_GATEWAY)
TARGETS = (*[str(s) for s in PIPELINE_SERVICES], str(ServiceName.COST_AUTOSCALER), NATS_TARGET)
"""What a fault may kill: each service, and the nats-server."""

STAGE_OUTPUTS = (subjects.DATASET_PREPARED, subjects.TRAINING_SCHEDULED,
                 subjects.MODEL_TRAINED, subjects.MODEL_QUANTIZED, subjects.MODEL_EXPORTED,
                 subjects.MODEL_DEPLOYED)
"""The output of each stage of a run, in order: each exactly once."""

STAGE_INPUTS: dict[str, tuple[ServiceName, int | None]] = {
    subjects.DATASET_READY.name: (ServiceName.DATA_PREP, None),
    subjects.DATASET_PREPARED.name: (ServiceName.SCHEDULER, None),
    subjects.TRAINING_SCHEDULED.name: (ServiceName.TRAINER, None),
    subjects.MODEL_TRAINED.name: (ServiceName.QUANTIZER, None),
    subjects.MODEL_QUANTIZED.name: (ServiceName.EXPORTER, None),
    subjects.MODEL_EXPORTED.name: (ServiceName.INFERENCE_GATEWAY, 0),
}
"""Each pipeline stage's input subject -> the consumer that records it (the gateway's
durable is per replica)."""


def _catalog_name(subject: str) -> str:
    """The catalog name of a stored subject: dataset.ready is stored with its tenant token
    (`lmforge.dataset.ready.default`), and the checks below look stages up by name."""
    try:
        return subjects.by_name(subject).name
    except KeyError:  # a dead letter, or a subject of no catalog entry: as it is
        return subject


@dataclass(kw_only=True, slots=True)
class ChaosConfig:
    """One chaos session."""

    runs: int = 20
    """Runs with a fault (the warm-up run comes on top)."""
    seed: int = 13
    """Seeds the targets' order and the moments of the kills."""
    targets: tuple[str, ...] = TARGETS
    """What may be killed; every target is used in turn before any is used again."""
    first_targets: tuple[str, ...] = ()
    """Targets of the first runs, in order, before the random ones (CI pins the
    nats-server kill this way)."""
    records_per_run: int = 120
    """Fortunes per run's corpus; each run takes its own slice."""
    run_timeout_s: float = 300.0
    """A run not deployed or failed by then counts as not finished."""
    budget_s: float = 3600.0
    """No run starts after this many seconds of the session."""
    warmup: bool = True
    """Time a run without a fault first, and kill at a random moment of that duration."""
    kill_window_s: tuple[float, float] = (5.0, 30.0)
    """Without a warm-up: kill at a random moment this many seconds after the publish."""
    nats_cluster: int = 0
    """0: the embedded nats-server; 3: `lmforge up --nats-cluster 3`."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for `lmforge up` (its services inherit it)."""


@dataclass(kw_only=True, slots=True)
class RunReport:
    """What one run did and what the checks found."""

    run_id: str
    target: str
    kill_after_s: float
    outcome: str = "timeout"
    """deployed, failed or timeout."""
    failure_reason: str = ""
    duration_s: float = 0.0
    fault_injected: bool = False
    """The kill -9 was sent."""
    killed_mid_run: bool = False
    """The kill landed before the run's outcome."""
    recover_s: float | None = None
    """Kill -> the target runs again and every service consumes."""
    killed_node: str = ""
    """The nats-server node killed (its server name), for a NATS target."""
    publish_gap_s: float | None = None
    """The longest wait between two acknowledged probe publishes around a NATS kill."""
    probe_publishes: int = 0
    outputs: dict[str, int] = field(default_factory=dict)
    """Events per stage output subject in the stream."""
    done_twice: list[str] = field(default_factory=list)
    """Stage outputs published by more than one publish call (work done twice)."""
    missing_records: list[str] = field(default_factory=list)
    missing_artifacts: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.outcome in ("deployed", "failed")


# -- the system under test ----------------------------------------------------------------

def lmforge(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, "-m", "lmforge.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"lmforge {' '.join(args)} -> {done.returncode}: {done.stderr}")
    return done.stdout


def read_status(home: Path) -> dict[str, Any] | None:
    from lmforge.cli.up import read_state

    return read_state(home)


def target_pids(state: dict[str, Any], target: str, node: str = "") -> list[int]:
    """The pids a kill of `target` hits: a service's replicas, the embedded nats-server,
    or the cluster node named `node`."""
    if target in (NATS_TARGET, NATS_LEADER):
        nodes = state["nats"].get("nodes") or [{"name": "", **state["nats"]}]
        return [n["pid"] for n in nodes if n.get("pid") and (not node or n["name"] == node)]
    return list(state["services"][target]["pids"])


def all_back(state: dict[str, Any] | None, target: str, killed: Sequence[int],
             node: str = "") -> bool:
    """The killed target runs again (new pids) and every service consumes."""
    if state is None or state["nats"]["state"] != "running":
        return False
    if any(s["state"] != "running" for s in state["services"].values()):
        return False
    pids = target_pids(state, target, node)
    return bool(pids) and not set(pids) & set(killed)


async def replica_counts(url: str, home: Path) -> list[int]:
    """Replicas of the event stream, the dead letters and the stage-record bucket."""
    nc = await connect(url, home)
    try:
        js = nc.jetstream()
        await js.key_value(Bucket.STAGE_RECORDS)  # created by the services on first use
        names_ = (subjects.STREAM, subjects.DEAD_LETTER_STREAM, f"KV_{Bucket.STAGE_RECORDS}")
        return [(await js.stream_info(name)).config.num_replicas or 0 for name in names_]
    finally:
        await nc.close()


async def stream_leader(nc: nats.NATS) -> str:
    """The server name of the event stream's leader."""
    info = await nc.jetstream().stream_info(subjects.STREAM)
    return info.cluster.leader if info.cluster and info.cluster.leader else ""


def write_corpus(directory: Path, index: int, records: int) -> Path:
    """The run's own slice of the fortunes (its own bytes: no stage cache hit)."""
    fortunes = CORPUS.read_text().split("\n%\n")
    start = (index * 53) % max(1, len(fortunes) - records)
    path = directory / f"chaos-{index:03d}.txt"
    path.write_text("\n%\n".join(fortunes[start:start + records]) + "\n")
    return path


def plan_targets(config: ChaosConfig) -> list[str]:
    """First the pinned targets, then every target once per round in a random order."""
    rng = random.Random(config.seed)
    plan = list(config.first_targets)
    while len(plan) < config.runs:
        round_ = list(config.targets)
        rng.shuffle(round_)
        plan += round_
    return plan[:config.runs]


# -- reading the stream back ---------------------------------------------------------------

@dataclass(slots=True)
class StoredEvent:
    subject: str
    headers: dict[str, str]
    data: bytes


class StreamReader:
    """Reads a stream from the last sequence it saw, by direct gets; survives NATS restarts."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.events: list[StoredEvent] = []
        self._next_seq = 1

    async def catch_up(self, nc: nats.NATS) -> None:
        js = nc.jetstream()
        info = await js.stream_info(self.stream)
        last = info.state.last_seq
        while self._next_seq <= last:
            try:
                msg = await js.get_msg(self.stream, self._next_seq)
            except nats.js.errors.NotFoundError:
                self._next_seq += 1  # a deleted message leaves a gap
                continue
            self.events.append(StoredEvent(_catalog_name(msg.subject or ""),
                                           dict(msg.headers or {}), msg.data or b""))
            self._next_seq += 1

    def of_run(self, run_id: str) -> list[StoredEvent]:
        return [e for e in self.events if e.headers.get(Header.RUN_ID) == run_id]

    def msg_ids(self) -> set[str]:
        return {e.headers.get(Header.MSG_ID, "") for e in self.events}


async def connect(url: str, home: Path) -> nats.NATS:
    """The admin connection of the running `lmforge up` of `home` (its credential and CA:
    reading the stage-record bucket is not the client role's right)."""
    from lmforge.cli.up import home_nats_auth

    async def quiet(exc: Exception) -> None:
        return None

    return await nats.connect(url.split(","), **home_nats_auth(home, "admin").connect_options(),
                              max_reconnect_attempts=-1,
                              reconnect_time_wait=0.3, connect_timeout=2, error_cb=quiet)


def artifact_digests(message: Message) -> Iterable[str]:
    """Every ArtifactRef digest anywhere in `message`."""
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        values = value if descriptor.is_repeated else [value]
        for item in values:
            if isinstance(item, ev.ArtifactRef):
                if item.digest:
                    yield item.digest
            elif isinstance(item, Message):
                yield from artifact_digests(item)


# -- one run -------------------------------------------------------------------------------

class ChaosSession:
    """A running system and the runs made against it."""

    def __init__(self, config: ChaosConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.home = workdir / "home"
        self.data = workdir / "data"
        self.journal = workdir / "journal"
        self.data.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "LMFORGE_HOME": str(self.home),
            "LMFORGE_DATA_ROOTS": str(self.data),
            "LMFORGE_DATAPREP_VOCAB_SIZE": "512",
            "LMFORGE_DATAPREP_SEQ_LEN": "64",
            "LMFORGE_SCHEDULER_TIME_BUDGET_S": "3",
            "OMP_WAIT_POLICY": "PASSIVE",
            JOURNAL_ENV: str(self.journal),
            **config.env,
        }
        self.stream = StreamReader(subjects.STREAM)
        self.dead = StreamReader(subjects.DEAD_LETTER_STREAM)
        self.nats_url = ""

    def up(self) -> None:
        args = ["up", "-d", "--gateway-port", "0", "--timeout", "300"]
        if self.config.nats_cluster:
            args += ["--nats-cluster", str(self.config.nats_cluster)]
        lmforge(self.env, *args, timeout=360)
        state = read_status(self.home)
        assert state is not None
        self.nats_url = state["nats_url"]

    def down(self) -> None:
        with contextlib.suppress(Exception):
            lmforge(self.env, "down", timeout=180)

    async def run(self, index: int, target: str | None, kill_after_s: float) -> RunReport:
        run_id = f"chaos-{index:03d}"
        report = RunReport(run_id=run_id, target=target or "none", kill_after_s=kill_after_s)
        corpus = write_corpus(self.data, index, self.config.records_per_run)
        started = time.monotonic()
        await asyncio.to_thread(lmforge, self.env, "run", str(corpus), "--model-name",
                                f"chaos{index}", "--run-id", run_id)
        fault = (asyncio.create_task(self._kill_and_time(target, started + kill_after_s,
                                                         report))
                 if target else None)
        nc = await connect(self.nats_url, self.home)
        try:
            outcome_at = await self._wait_for_outcome(nc, run_id, started, report)
            if fault is not None:
                await fault
                report.killed_mid_run = (report.fault_injected
                                         and started + kill_after_s < outcome_at)
            # Let a stage that a kill made run twice publish its second copy, if any.
            await asyncio.sleep(3)
            await self._check(nc, report)
        finally:
            if fault is not None and not fault.done():
                fault.cancel()
            await nc.close()
        return report

    async def _kill_and_time(self, target: str, at: float, report: RunReport) -> None:
        nats_fault = target in (NATS_TARGET, NATS_LEADER)
        probe = (asyncio.create_task(self._probe_publishes(report))
                 if nats_fault else None)
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        if target == NATS_LEADER:
            nc = await connect(self.nats_url, self.home)
            try:
                report.killed_node = await stream_leader(nc)
            finally:
                await nc.close()
        state = read_status(self.home)
        pids = target_pids(state, target, report.killed_node) if state else []
        if not pids:
            report.problems.append(f"nothing to kill for {target}: {state and state['nats']}")
            if probe is not None:
                probe.cancel()
            return
        killed_at = time.monotonic()
        report.fault_injected = True
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = killed_at + 120
        try:
            while time.monotonic() < deadline:
                if all_back(read_status(self.home), target, pids, report.killed_node):
                    report.recover_s = round(time.monotonic() - killed_at, 2)
                    await asyncio.sleep(2)  # the probe sees a few publishes after it
                    return
                await asyncio.sleep(0.1)
            report.problems.append(f"{target} not back 120 s after the kill")
        finally:
            if probe is not None:
                probe.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await probe

    async def _probe_publishes(self, report: RunReport) -> None:
        """Publish a progress event every 50 ms through the services' own retrying
        publish; the longest wait between two acknowledgements is the publish gap a
        service sees. Each is journalled, so the loss check covers them too."""
        from lmforge.bus import EventBus

        bus = EventBus("chaos-probe")
        bus.journal = PublishJournal(self.journal)
        from lmforge.cli.up import home_nats_auth

        await bus.connect(self.nats_url, stream_replicas=self.config.nats_cluster or 1,
                          auth=home_nats_auth(self.home, "admin"))
        last = time.monotonic()
        try:
            while True:
                report.probe_publishes += 1
                await bus.publish(ev.TrainingProgress(run_id=f"{report.run_id}-probe"),
                                  msg_id=f"{report.run_id}:probe:{report.probe_publishes}")
                now = time.monotonic()
                report.publish_gap_s = round(max(report.publish_gap_s or 0.0, now - last), 3)
                last = now
                await asyncio.sleep(0.05)
        finally:
            await bus.close(grace_s=1)

    async def _wait_for_outcome(self, nc: nats.NATS, run_id: str, started: float,
                                report: RunReport) -> float:
        deadline = started + self.config.run_timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
                await self.stream.catch_up(nc)
            for event in self.stream.of_run(run_id):
                if event.subject == subjects.MODEL_DEPLOYED.name:
                    report.outcome = "deployed"
                elif event.subject == subjects.STAGE_FAILED.name:
                    report.outcome = "failed"
                    report.failure_reason = subjects.STAGE_FAILED.decode(event.data).reason
            if report.finished:
                now = time.monotonic()
                report.duration_s = round(now - started, 2)
                return now
            await asyncio.sleep(0.5)
        report.duration_s = round(time.monotonic() - started, 2)
        report.problems.append(f"no model.deployed or stage.failed within "
                               f"{self.config.run_timeout_s:.0f}s")
        return time.monotonic()

    async def _check(self, nc: nats.NATS, report: RunReport) -> None:
        for reader in (self.stream, self.dead):
            for _ in range(60):  # NATS may still be coming back
                try:
                    await reader.catch_up(nc)
                    break
                except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
                    await asyncio.sleep(0.5)
        events = self.stream.of_run(report.run_id)
        counts = Counter(e.subject for e in events)
        report.outputs = {s.name: counts.get(s.name, 0) for s in STAGE_OUTPUTS}
        failures = counts.get(subjects.STAGE_FAILED.name, 0)
        if report.outcome == "deployed":
            wrong = {k: v for k, v in report.outputs.items() if v != 1}
            if wrong:
                report.problems.append(f"stage outputs not exactly once: {wrong}")
            if failures:
                report.problems.append(f"deployed, yet {failures} stage.failed")
        elif report.outcome == "failed":
            if failures != 1 or not report.failure_reason:
                report.problems.append(f"failed {failures} times (want once with a reason)")
            twice = {k: v for k, v in report.outputs.items() if v > 1}
            if twice:
                report.problems.append(f"stage outputs more than once: {twice}")
        calls = Counter(entry.msg_id for entry in read_journal(self.journal)
                        if entry.run_id == report.run_id
                        and entry.subject in {s.name for s in STAGE_OUTPUTS})
        report.done_twice = sorted(msg_id for msg_id, n in calls.items() if n > 1)
        report.missing_records = await self._missing_records(nc, events)
        store = self.home / "artifacts" / "sha256"
        for event in events:
            if event.subject not in {s.name for s in STAGE_OUTPUTS}:
                continue
            message = subjects.by_name(event.subject).decode(event.data)
            for digest in artifact_digests(message):
                if not (store / digest.removeprefix("sha256:")).is_dir():
                    report.missing_artifacts.append(f"{event.subject}: {digest}")

    async def _missing_records(self, nc: nats.NATS, events: list[StoredEvent]) -> list[str]:
        """Stage inputs of the run without their stage record (the consumer never noted
        that it did the work, so a redelivery would do it again)."""
        kv = await nc.jetstream().key_value(Bucket.STAGE_RECORDS)
        missing = []
        for event in events:
            if event.subject not in STAGE_INPUTS:
                continue
            service, replica = STAGE_INPUTS[event.subject]
            durable = names.durable_name(service, subjects.by_name(event.subject),
                                         replica=replica)
            try:
                await kv.get(f"{durable}.{payload_digest(event.data)}")
            except nats.js.errors.KeyNotFoundError:
                missing.append(f"{durable} ({event.subject})")
        return missing

    def lost_events(self) -> list[str]:
        """Ids a publisher saw acknowledged that are in neither the stream nor the dead
        letters."""
        stored = self.stream.msg_ids() | self.dead.msg_ids()
        return sorted({e.msg_id for e in read_journal(self.journal)} - stored)


# -- the session ---------------------------------------------------------------------------

def summarise(reports: list[RunReport], lost: list[str], warmup_s: float,
              config: ChaosConfig, elapsed_s: float) -> dict[str, Any]:
    faulted = [r for r in reports if r.target != "none"]
    recover = sorted(r.recover_s for r in faulted if r.recover_s is not None)
    return {
        "runs": len(reports),
        "faults_injected": sum(r.fault_injected for r in faulted),
        "faults_recovered_in_120s": sum(r.recover_s is not None for r in faulted),
        "faults_mid_run": sum(r.killed_mid_run for r in faulted),
        "nats_server_kills": sum(r.target in (NATS_TARGET, NATS_LEADER)
                                 and r.fault_injected
                                 for r in faulted),
        "runs_finished": sum(r.finished for r in reports),
        "runs_deployed": sum(r.outcome == "deployed" for r in reports),
        "runs_failed_once": sum(r.outcome == "failed" and not r.problems for r in reports),
        "events_lost": len(lost),
        "stages_done_twice": sum(len(r.done_twice) for r in reports),
        "stage_outputs_not_once": sum(
            any(v != 1 for v in r.outputs.values()) for r in reports if r.outcome == "deployed"),
        "missing_stage_records": sum(len(r.missing_records) for r in reports),
        "missing_artifacts": sum(len(r.missing_artifacts) for r in reports),
        "recover_s_p50": round(statistics.median(recover), 2) if recover else None,
        "recover_s_max": max(recover) if recover else None,
        "nats_publish_gap_s_max": max((r.publish_gap_s for r in faulted
                                       if r.publish_gap_s is not None), default=None),
        "run_s_p50": round(statistics.median(r.duration_s for r in reports), 1)
        if reports else None,
        "warmup_run_s": round(warmup_s, 1),
        "elapsed_s": round(elapsed_s, 1),
        "config": {"runs": config.runs, "seed": config.seed, "budget_s": config.budget_s,
                   "nats_cluster": config.nats_cluster,
                   "records_per_run": config.records_per_run},
        "lost_ids": lost[:20],
        "per_run": [asdict(r) for r in reports],
    }


async def run_session(config: ChaosConfig, workdir: Path) -> dict[str, Any]:
    """Start the system, a warm-up run, then `config.runs` runs with a kill each."""
    session_start = time.monotonic()
    session = ChaosSession(config, workdir)
    reports: list[RunReport] = []
    warmup_s = 0.0
    try:
        # Inside the try: an `up` that times out leaves its supervisor running.
        await asyncio.to_thread(session.up)
        window = config.kill_window_s
        if config.warmup:
            warmup = await session.run(0, None, 0.0)
            if not warmup.finished:
                raise RuntimeError(f"the warm-up run did not finish: {warmup}")
            warmup_s = warmup.duration_s
            window = (0.05 * warmup_s, 0.9 * warmup_s)
        rng = random.Random(config.seed + 1)
        for index, target in enumerate(plan_targets(config), start=1):
            if time.monotonic() - session_start > config.budget_s:
                break
            kill_after = round(rng.uniform(*window), 2)
            report = await session.run(index, target, kill_after)
            reports.append(report)
            print(json.dumps({k: v for k, v in asdict(report).items()
                              if k not in ("outputs",)}), file=sys.stderr, flush=True)
        replicas = await replica_counts(session.nats_url, session.home)
        async_nc = await connect(session.nats_url, session.home)
        try:
            await session.stream.catch_up(async_nc)
            await session.dead.catch_up(async_nc)
        finally:
            await async_nc.close()
        lost = session.lost_events()
    finally:
        await asyncio.to_thread(session.down)
    return {**summarise(reports, lost, warmup_s, config, time.monotonic() - session_start),
            "replicas": replicas}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--budget-s", type=float, default=3600.0,
                        help="no run starts after this many seconds")
    parser.add_argument("--run-timeout-s", type=float, default=300.0)
    parser.add_argument("--records", type=int, default=120, help="fortunes per run")
    parser.add_argument("--nats-cluster", type=int, default=0, choices=(0, 3),
                        help="3: a three-node cluster, and the NATS kills hit the stream "
                             "leader")
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    nats_target = NATS_LEADER if args.nats_cluster else NATS_TARGET
    config = ChaosConfig(runs=args.runs, seed=args.seed, budget_s=args.budget_s,
                         run_timeout_s=args.run_timeout_s, records_per_run=args.records,
                         nats_cluster=args.nats_cluster, first_targets=(nats_target,),
                         targets=(*TARGETS[:-1], nats_target))
    with tempfile.TemporaryDirectory(prefix="lmforge-chaos-") as tmp:
        result = asyncio.run(run_session(config, args.workdir or Path(tmp)))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
