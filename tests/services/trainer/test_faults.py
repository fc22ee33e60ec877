"""The trainer as a real process: kill -9 mid-run and SIGTERM (a spot notice)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from lmforge.artifacts import ArtifactStore
from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from services.data_prep.prepare import PrepConfig, prepare_dataset
from services.scheduler.handlers import SchedulerService
from services.trainer.config import TrainConfig
from tests.conftest import TEST_DATA, TINY_MODEL, TINY_PRESET
from tests.helpers import count_events, in_process_service, publish, wait_for_events

pytestmark = pytest.mark.connected


def _start_trainer(nats_url, home, log, **settings):
    env = {**os.environ, "LMFORGE_NATS_URL": nats_url, "LMFORGE_HOME": str(home),
           "OMP_WAIT_POLICY": "PASSIVE", **settings}
    return subprocess.Popen([sys.executable, "-m", "services.trainer"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _scheduled(tmp_path, run_id, steps, interval) -> tuple[ev.TrainingScheduled, object]:
    home = tmp_path / "home"
    store = ArtifactStore(home / "artifacts")
    prepare_dataset(TEST_DATA / "fortunes-sample.txt", "text", "", tmp_path / "ds",
                    PrepConfig(vocab_size=512, seq_len=TINY_MODEL["seq_len"]))
    dataset = store.put_dir(tmp_path / "ds")
    plan = ev.ResourcePlan(**TrainConfig.from_preset(
        TINY_PRESET, max_steps=steps, warmup_steps=5, checkpoint_interval=interval,
        seed=7).plan_fields(), device="cpu")
    event = ev.TrainingScheduled(run_id=run_id, model_name="m", plan=plan,
                                 dataset=ev.ArtifactRef(digest=dataset.digest))
    return event, home


async def _first_progress_of_delivery(nats_url: str, delivery: int, timeout: float = 120
                                      ) -> ev.TrainingProgress:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        seen = await count_events(nats_url, subjects.TRAINING_PROGRESS)
        for progress in await wait_for_events(nats_url, subjects.TRAINING_PROGRESS, seen):
            if progress.delivery >= delivery:
                return progress
        await asyncio.sleep(0.2)
    raise TimeoutError(f"no training.progress of delivery {delivery} in {timeout:.0f}s")


def test_kill_9_mid_run_then_restart_finishes_from_the_last_checkpoint(nats_server, tmp_path):
    event, home = _scheduled(tmp_path, "killed", steps=300, interval=30)
    log = (tmp_path / "trainer.log").open("ab")

    async def scenario():
        trainer = _start_trainer(nats_server.url, home, log)
        try:
            await publish(nats_server.url, event, msg_id="killed:scheduled")
            (checkpointed,) = await wait_for_events(
                nats_server.url, subjects.TRAINING_CHECKPOINTED, 1, timeout=120)
            trainer.kill()  # SIGKILL: no checkpoint, no goodbye
            trainer.wait()
            killed_at = time.monotonic()
            trainer = _start_trainer(nats_server.url, home, log)
            resumed = await _first_progress_of_delivery(nats_server.url, 2)
            took_back_s = time.monotonic() - killed_at
            (trained,) = await wait_for_events(nats_server.url, subjects.MODEL_TRAINED, 1,
                                               timeout=240)
            await asyncio.sleep(0.5)
            assert await count_events(nats_server.url, subjects.MODEL_TRAINED) == 1
            return checkpointed, trained, resumed, took_back_s
        finally:
            trainer.kill()
            trainer.wait()

    checkpointed, trained, resumed, took_back_s = asyncio.run(scenario())
    # The restarted trainer takes the job back within seconds (the ack wait is short,
    # the live trainer's heartbeats keep it), not after a 30 s ack wait.
    print(f"trainer kill -9: job taken back after {took_back_s:.1f}s")
    assert took_back_s < 20, took_back_s
    assert resumed.step > checkpointed.step and resumed.attempt == 0
    assert trained.steps == 300
    assert trained.resumed_from_step >= checkpointed.step >= 30
    assert trained.heldout_perplexity > 1


def test_sigterm_checkpoints_hands_back_and_the_job_resumes_losing_no_steps(nats_server,
                                                                           tmp_path):
    event, home = _scheduled(tmp_path, "spot", steps=300, interval=100)
    log = (tmp_path / "trainer.log").open("ab")

    async def scenario():
        async with in_process_service(SchedulerService, nats_server.url, home=home):
            trainer = _start_trainer(nats_server.url, home, log)
            try:
                await publish(nats_server.url, event, msg_id="spot:scheduled")
                await wait_for_events(nats_server.url, subjects.TRAINING_PROGRESS, 2,
                                      timeout=120)
                trainer.send_signal(signal.SIGTERM)  # the spot notice
                assert await asyncio.to_thread(trainer.wait, 60) == 0
                (preempted,) = await wait_for_events(
                    nats_server.url, subjects.TRAINING_PREEMPTED, 1)
                rescheduled = await wait_for_events(
                    nats_server.url, subjects.TRAINING_SCHEDULED, 2)
                trainer = _start_trainer(nats_server.url, home, log)
                (trained,) = await wait_for_events(nats_server.url, subjects.MODEL_TRAINED, 1,
                                                   timeout=240)
                return preempted, rescheduled[1], trained
            finally:
                trainer.kill()
                trainer.wait()

    preempted, rescheduled, trained = asyncio.run(scenario())
    assert 0 < preempted.step < 300
    assert rescheduled.attempt == 1
    assert trained.resumed_from_step == preempted.step  # zero steps lost
    assert trained.steps == 300


class _InstanceActionEndpoint:
    """A stand-in for AWS's instance metadata service (which only exists on EC2): 404 on
    `/latest/meta-data/spot/instance-action` until `notify()`, then the notice EC2 gives."""

    def __init__(self) -> None:
        import http.server
        import threading

        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                endpoint.polls += 1
                if endpoint.notice is None:
                    self.send_error(404)
                    return
                body = endpoint.notice.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.polls = 0
        self.notice: str | None = None
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = (f"http://127.0.0.1:{self.server.server_address[1]}"
                    "/latest/meta-data/spot/instance-action")

    def notify(self) -> None:
        self.notice = '{"action": "terminate", "time": "2026-11-28T22:00:00Z"}'


def test_a_spot_notice_hands_back_and_another_machine_resumes_from_the_object_store(
        nats_server, tmp_path, s3):
    """Trainer A (its own LMFORGE_HOME) polls a notice endpoint; when the notice comes it
    checkpoints, says why in training.preempted and exits. Trainer B, with another
    LMFORGE_HOME and nothing on its disk, fetches the dataset and the checkpoint from the
    object store and finishes the run with no step lost."""
    from lmforge.object_store import RemoteArtifacts

    url = s3.url("artifacts")
    home_a, home_b = tmp_path / "machine-a", tmp_path / "machine-b"
    store_a = ArtifactStore(home_a / "artifacts", remote=RemoteArtifacts(url))
    prepare_dataset(TEST_DATA / "fortunes-sample.txt", "text", "", tmp_path / "ds",
                    PrepConfig(vocab_size=512, seq_len=TINY_MODEL["seq_len"]))
    dataset = store_a.put_dir(tmp_path / "ds")
    plan = ev.ResourcePlan(**TrainConfig.from_preset(
        TINY_PRESET, max_steps=300, warmup_steps=5, checkpoint_interval=100,
        seed=7).plan_fields(), device="cpu")
    event = ev.TrainingScheduled(run_id="spot-s3", model_name="m", plan=plan,
                                 dataset=ev.ArtifactRef(digest=dataset.digest))
    endpoint = _InstanceActionEndpoint()
    log = (tmp_path / "trainer.log").open("ab")
    shared = {"LMFORGE_ARTIFACT_URL": url}

    async def scenario():
        async with in_process_service(SchedulerService, nats_server.url, home=home_a):
            trainer = _start_trainer(nats_server.url, home_a, log, **shared,
                                     LMFORGE_TRAINER_SPOT_NOTICES=f"aws={endpoint.url}",
                                     LMFORGE_TRAINER_SPOT_POLL_S="0.2")
            try:
                await publish(nats_server.url, event, msg_id="spot-s3:scheduled")
                await wait_for_events(nats_server.url, subjects.TRAINING_PROGRESS, 2,
                                      timeout=120)
                endpoint.notify()
                assert await asyncio.to_thread(trainer.wait, 60) == 0
                (preempted,) = await wait_for_events(
                    nats_server.url, subjects.TRAINING_PREEMPTED, 1)
                await wait_for_events(nats_server.url, subjects.TRAINING_SCHEDULED, 2)
                trainer = _start_trainer(nats_server.url, home_b, log, **shared)
                (trained,) = await wait_for_events(nats_server.url, subjects.MODEL_TRAINED, 1,
                                                   timeout=240)
                return preempted, trained
            finally:
                trainer.kill()
                trainer.wait()

    preempted, trained = asyncio.run(scenario())
    assert preempted.reason == "spot notice from aws: terminate at 2026-11-28T22:00:00Z"
    assert 0 < preempted.step < 300 and endpoint.polls >= 2
    assert trained.resumed_from_step == preempted.step and trained.steps == 300
    # machine B read everything from the object store, not from A's disk
    assert (home_b / "artifacts" / "sha256" / dataset.digest[7:]).is_dir()
    assert (home_b / "artifacts" / "sha256" / preempted.checkpoint.digest[7:]).is_dir()
