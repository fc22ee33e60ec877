"""Spot notice to resumed training: steps lost and seconds, end to end on the bus.

A real nats-server, the scheduler and trainer services as processes, the demo
model (`TrainConfig.from_preset("tiny")`: sequence 128, micro-batch 16) on the
shipped corpus.
Once training runs, the trainer gets SIGTERM (a spot notice). It checkpoints
and publishes training.preempted; the scheduler publishes a new
training.scheduled; a trainer resumes. Two cases:

- warm: a second trainer replica is already running and picks the job up;
- cold: the only trainer is restarted after it exits (what `lmforge up`'s
  supervisor does).

Measured from the SIGTERM to the first training.progress of the resumed job
(published right after its first step). Steps lost = preempted step minus the
step the resumed job started from. Targets: 0 steps lost, <= 30 s.

A third case is a spot notice on one machine and the resume on another: trainer A
(its own LMFORGE_HOME) polls a notice endpoint (a local HTTP server answering as
EC2's instance-action does once "notified"); trainer B has another LMFORGE_HOME
and nothing on disk, and reads the dataset and the checkpoint from an object store
(LMFORGE_ARTIFACT_URL: moto's S3 server on 127.0.0.1, which stands in for S3 here).
Reported: notice to training.preempted (the checkpoint is stored and uploaded
before it is published), preempted to B's first resumed step, and the object
store's upload and download MB/s on a 512 MB artifact with the time that gives for
a 1B model with Adam state (~16 GB). Moto on loopback is a Python server, so the
MB/s is the stand-in's, not S3's.

    python benchmarks/spot_resume.py
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmforge.artifacts import ArtifactStore
from lmforge.bus import EventBus
from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.runtime.nats_server import NatsServer
from services.data_prep.prepare import PrepConfig, prepare_dataset
from services.trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = TrainConfig.from_preset("tiny", max_steps=400, warmup_steps=20,
                                 checkpoint_interval=1000, seed=1)
"""The demo model as the scheduler plans it; checkpoints only on the spot notice."""


def start(module: str, url: str, home: Path, **settings: str) -> subprocess.Popen:
    env = {**os.environ, "LMFORGE_NATS_URL": url, "LMFORGE_HOME": str(home),
           "OMP_WAIT_POLICY": "PASSIVE", "LMFORGE_ACK_WAIT_S": "10", **settings}
    return subprocess.Popen([sys.executable, "-m", module], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def scenario(warm: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        store = ArtifactStore(home / "artifacts")
        prepare_dataset(ROOT / "tests/data/fortunes-sample.txt", "text", "", Path(tmp) / "ds",
                        PrepConfig(vocab_size=4096, seq_len=CONFIG.batch.seq_len))
        dataset = store.put_dir(Path(tmp) / "ds")
        server = NatsServer(store_dir=Path(tmp) / "nats").start()
        procs = [start("services.scheduler", server.url, home),
                 start("services.trainer", server.url, home)]
        bus = EventBus("bench")
        await bus.connect(server.url)
        sub = await bus.js.subscribe("lmforge.training.>", ordered_consumer=True)
        try:
            await asyncio.sleep(4)  # let the first trainer take the consumer
            if warm:
                procs.append(start("services.trainer", server.url, home))
            plan = ev.ResourcePlan(**CONFIG.plan_fields(), device="cpu")
            await bus.publish(ev.TrainingScheduled(
                run_id="spot", model_name="m", plan=plan,
                dataset=ev.ArtifactRef(digest=dataset.digest)), msg_id="spot")
            sigterm_at = preempted = None
            while True:
                msg = await sub.next_msg(timeout=300)
                if msg.subject == subjects.TRAINING_PROGRESS.name:
                    progress = subjects.TRAINING_PROGRESS.decode(msg.data)
                    if sigterm_at is None and progress.step >= 20:
                        procs[1].send_signal(signal.SIGTERM)
                        sigterm_at = time.monotonic()
                    elif preempted is not None and progress.step > preempted.step:
                        resumed_at = time.monotonic()
                        break
                elif msg.subject == subjects.TRAINING_PREEMPTED.name:
                    preempted = subjects.TRAINING_PREEMPTED.decode(msg.data)
                    if not warm:
                        procs[1].wait(60)
                        procs[1] = start("services.trainer", server.url, home)
            # The resumed job reports the step it resumed from in model.trained; here
            # the first resumed step is preempted.step + 1 if nothing was lost.
            return {"case": "warm standby" if warm else "cold restart",
                    "preempted_at_step": preempted.step,
                    "first_resumed_step": progress.step,
                    "steps_lost": progress.step - 1 - preempted.step,
                    "sigterm_to_resumed_step_s": round(resumed_at - sigterm_at, 2)}
        finally:
            await bus.close()
            for p in procs:
                p.kill()
            server.stop()


class NoticeEndpoint:
    """EC2's instance-action endpoint as a local server: 404 until `notify()`."""

    def __init__(self) -> None:
        import http.server
        import threading

        endpoint = self
        self.notice = b""

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if not endpoint.notice:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(endpoint.notice)))
                self.end_headers()
                self.wfile.write(endpoint.notice)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/spot/instance-action"

    def notify(self) -> None:
        self.notice = b'{"action": "terminate", "time": "in two minutes"}'


def object_store_env() -> tuple[object, str]:
    """moto's S3 server on 127.0.0.1 and a bucket; the AWS environment pointed at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
    boto3.client("s3").create_bucket(Bucket="ckpt")
    return server, "s3://ckpt/lmforge"


def transfer_rates(url: str, megabytes: int = 512) -> dict:
    from lmforge.object_store import RemoteArtifacts

    with tempfile.TemporaryDirectory() as tmp:
        here = ArtifactStore(Path(tmp) / "a", remote=RemoteArtifacts(url))
        src = Path(tmp) / "state"
        src.mkdir()
        for i in range(megabytes // 128):
            (src / f"shard-{i}.bin").write_bytes(os.urandom(128 << 20))
        stored = here.put_dir(src, move=True)
        assert here.remote is not None and here.remote.last_transfer is not None
        up = here.remote.last_transfer
        there = ArtifactStore(Path(tmp) / "b", remote=RemoteArtifacts(url))
        there.get_dir(stored.digest)
        assert there.remote is not None and there.remote.last_transfer is not None
        down = there.remote.last_transfer
    return {"artifact_mb": megabytes, "upload_mb_per_s": round(up.mb_per_s, 1),
            "download_mb_per_s": round(down.mb_per_s, 1),
            "one_b_with_adam_16gb_upload_s": round(16e3 / up.mb_per_s, 1),
            "one_b_with_adam_16gb_download_s": round(16e3 / down.mb_per_s, 1),
            "target_state_moved_s": 180}


async def notice_on_one_machine_resume_on_another(url: str) -> dict:
    endpoint = NoticeEndpoint()
    with tempfile.TemporaryDirectory() as tmp:
        home_a, home_b = Path(tmp) / "machine-a", Path(tmp) / "machine-b"
        shared = {"LMFORGE_ARTIFACT_URL": url}
        from lmforge.object_store import RemoteArtifacts

        store = ArtifactStore(home_a / "artifacts", remote=RemoteArtifacts(url))
        prepare_dataset(ROOT / "tests/data/fortunes-sample.txt", "text", "", Path(tmp) / "ds",
                        PrepConfig(vocab_size=4096, seq_len=CONFIG.batch.seq_len))
        dataset = store.put_dir(Path(tmp) / "ds")
        server = NatsServer(store_dir=Path(tmp) / "nats").start()
        procs = [start("services.scheduler", server.url, home_a),
                 start("services.trainer", server.url, home_a, **shared,
                       LMFORGE_TRAINER_SPOT_NOTICES=f"aws={endpoint.url}",
                       LMFORGE_TRAINER_SPOT_POLL_S="1")]
        bus = EventBus("bench")
        await bus.connect(server.url)
        sub = await bus.js.subscribe("lmforge.training.>", ordered_consumer=True)
        try:
            await asyncio.sleep(4)
            plan = ev.ResourcePlan(**CONFIG.plan_fields(), device="cpu")
            await bus.publish(ev.TrainingScheduled(
                run_id="spot-s3", model_name="m", plan=plan,
                dataset=ev.ArtifactRef(digest=dataset.digest)), msg_id="spot-s3")
            notified_at = preempted = None
            while True:
                msg = await sub.next_msg(timeout=300)
                if msg.subject == subjects.TRAINING_PROGRESS.name:
                    progress = subjects.TRAINING_PROGRESS.decode(msg.data)
                    if notified_at is None and progress.step >= 20:
                        endpoint.notify()
                        notified_at = time.monotonic()
                    elif preempted is not None and progress.step > preempted.step:
                        resumed_at = time.monotonic()
                        break
                elif msg.subject == subjects.TRAINING_PREEMPTED.name:
                    preempted = subjects.TRAINING_PREEMPTED.decode(msg.data)
                    preempted_at = time.monotonic()
                    procs.append(start("services.trainer", server.url, home_b, **shared))
            return {"case": "spot notice on machine A, resume on machine B from the object "
                            "store",
                    "reason": preempted.reason,
                    "preempted_at_step": preempted.step,
                    "first_resumed_step": progress.step,
                    "steps_lost": progress.step - 1 - preempted.step,
                    "notice_poll_s": 1.0,
                    "notice_to_preempted_s": round(preempted_at - notified_at, 2),
                    "preempted_to_resumed_step_on_b_s": round(resumed_at - preempted_at, 2)}
        finally:
            await bus.close()
            for p in procs:
                p.kill()
            server.stop()
            endpoint.server.shutdown()


def main() -> int:
    results = [asyncio.run(scenario(warm=True)), asyncio.run(scenario(warm=False))]
    moto, url = object_store_env()
    try:
        results.append(asyncio.run(notice_on_one_machine_resume_on_another(url)))
        results.append({"case": "object store transfer (moto on 127.0.0.1)",
                        **transfer_rates(url)})
    finally:
        moto.stop()  # type: ignore[attr-defined]
    print(json.dumps({"benchmark": "spot_resume", "results": results,
                      "target_steps_lost": 0, "target_seconds": 30}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
