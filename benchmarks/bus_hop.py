"""Bus overhead: one event hop between two services, and the pipeline's orchestration share.

Prints JSON. Two measurements, each in one run so the numbers are comparable:

1. hop latency: a producer process publishes `n` events through `EventBus.publish`
   (JetStream, file-backed, Nats-Msg-Id, trace headers); a consumer *process* takes
   them through the full consumer path (durable pull consumer, decode, stage-record
   check) and records now - sent (one machine, one clock). p50/p99 in ms.
   Target: p99 <= 5 ms.
2. orchestration share: a real pipeline run (`lmforge up`, the shipped fortunes
   sample, a short training budget); from the stream timestamps and the
   `Lmforge-Work-Started-Ns` header each handler stamps on its output, the wall
   time from dataset.ready to model.deployed is split into stage work and the
   time between a stage's input landing and its handler starting. Target <= 1%.

    python benchmarks/bus_hop.py [--events 2000] [--skip-pipeline] [--home DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from google.protobuf.message import Message

from lmforge.bus import EventBus
from lmforge.contracts import subjects
from lmforge.contracts.names import Header
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import Delivery, Subscription
from lmforge.runtime.nats_server import NatsServer

ROOT = Path(__file__).resolve().parents[1]

SENT = "Bench-Sent-Ns"
CHAIN = [subjects.DATASET_READY, subjects.DATASET_PREPARED, subjects.TRAINING_SCHEDULED,
         subjects.MODEL_TRAINED, subjects.MODEL_QUANTIZED, subjects.MODEL_EXPORTED,
         subjects.MODEL_DEPLOYED]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def consumer_process(url: str, n: int, ready, results) -> None:
    async def main() -> None:
        bus = EventBus("bench-consumer")
        await bus.connect(url)
        latencies: list[float] = []
        done = asyncio.Event()

        async def on_progress(event: Message, delivery: Delivery) -> None:
            latencies.append((time.time_ns() - int(delivery.headers[SENT])) / 1e6)
            if len(latencies) >= n:
                done.set()

        # A bare subscription (no service): the full dispatch path, stage records included.
        bus.subscribe(Subscription(subject=subjects.TRAINING_PROGRESS, handler=on_progress,
                                   durable="bench-consumer", ack_wait_s=30, max_deliver=5))
        await bus.start()
        ready.set()
        await asyncio.wait_for(done.wait(), timeout=300)
        results.put(latencies)
        await bus.close()

    asyncio.run(main())


def measure_hops(n: int, interval_s: float, warmup: int = 100) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(store_dir=Path(tmp) / "nats").start()
        ctx = mp.get_context("spawn")
        ready, results = ctx.Event(), ctx.Queue()
        consumer = ctx.Process(target=consumer_process, args=(server.url, n + warmup, ready,
                                                              results))
        consumer.start()
        ready.wait(60)

        async def produce() -> None:
            bus = EventBus("bench-producer")
            await bus.connect(server.url)
            for i in range(n + warmup):
                event = ev.TrainingProgress(run_id="bench", step=i)
                await bus.publish(event, msg_id=f"bench-{i}",
                                  headers={SENT: str(time.time_ns())})
                await asyncio.sleep(interval_s)  # latency at a steady rate, not throughput
            await bus.close()

        asyncio.run(produce())
        latencies = results.get(timeout=120)[warmup:]
        consumer.join(30)
        server.stop()
    return {"events": len(latencies), "p50_ms": round(statistics.median(latencies), 3),
            "p99_ms": round(percentile(latencies, 0.99), 3),
            "max_ms": round(max(latencies), 3), "target_p99_ms": 5.0}


async def read_run(nats_url: str, run_id: str) -> dict[str, tuple[float, dict]]:
    import nats

    nc = await nats.connect(nats_url)
    sub = await nc.jetstream().subscribe("lmforge.>", ordered_consumer=True,
                                          stream=subjects.STREAM)
    found: dict[str, tuple[float, dict]] = {}
    while True:
        try:
            msg = await sub.next_msg(timeout=1)
        except Exception:
            break
        headers = dict(msg.headers or {})
        if headers.get(Header.RUN_ID) == run_id and msg.subject not in found:
            found[msg.subject] = (msg.metadata.timestamp.timestamp(), headers)
    await nc.close()
    return found


def orchestration_share(home: Path | None, budget_s: float) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    tmp = None
    if home is None:
        tmp = tempfile.TemporaryDirectory()
        home = Path(tmp.name) / "home"
    env.update({"LMFORGE_HOME": str(home),
                "LMFORGE_DATA_ROOTS": str(ROOT / "tests" / "data")})
    cli = [sys.executable, "-m", "lmforge.cli.main"]
    subprocess.run([*cli, "up", "-d", "--gateway-port", "0"], env=env, check=True,
                   capture_output=True)
    try:
        subprocess.run([*cli, "run", str(ROOT / "tests/data/fortunes-sample.txt"),
                        "--model-name", "bench", "--run-id", "bench-run", "--follow",
                        "--time-budget", str(budget_s), "--timeout", "900"],
                       env=env, check=True, capture_output=True)
        status = json.loads(subprocess.run([*cli, "status", "--json"], env=env, check=True,
                                           capture_output=True, text=True).stdout)
        events = asyncio.run(read_run(status["nats_url"], "bench-run"))
    finally:
        subprocess.run([*cli, "down"], env=env, capture_output=True)
        if tmp is not None:
            tmp.cleanup()
    stages, waiting = {}, 0.0
    for before, after in itertools.pairwise(CHAIN):
        landed = events[before.name][0]
        finished, headers = events[after.name]
        started = int(headers[Header.WORK_STARTED_NS]) / 1e9
        waiting += started - landed
        stages[after.name.removeprefix("lmforge.")] = {
            "bus_s": round(started - landed, 4), "work_s": round(finished - started, 3)}
    wall = events[CHAIN[-1].name][0] - events[CHAIN[0].name][0]
    return {"wall_s": round(wall, 2), "orchestration_s": round(waiting, 4),
            "orchestration_share": round(waiting / wall, 5), "target_share": 0.01,
            "per_hop": stages}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--interval-ms", type=float, default=10.0,
                        help="gap between published events (100/s by default)")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--time-budget", type=float, default=20)
    parser.add_argument("--home", type=Path)
    args = parser.parse_args()
    report = {"benchmark": "bus_hop", "hop": measure_hops(args.events, args.interval_ms / 1e3)}
    report["hop"]["interval_ms"] = args.interval_ms
    report["hop"]["meets_target"] = report["hop"]["p99_ms"] <= report["hop"]["target_p99_ms"]
    if not args.skip_pipeline:
        report["pipeline"] = orchestration_share(args.home, args.time_budget)
        report["pipeline"]["meets_target"] = (
            report["pipeline"]["orchestration_share"] <= report["pipeline"]["target_share"])
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
