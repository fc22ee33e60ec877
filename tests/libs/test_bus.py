"""The bus's contract, on the in-memory bus and on a real nats-server.

Every test here runs twice (the `harness` fixture): the in-memory run is the
unit tier, the NATS run is marked `connected`.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from lmforge.contracts import subjects
from lmforge.contracts.names import Header, ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import Delivery, subscriber
from lmforge.failures import BadInput
from lmforge.service import Bus, Service
from lmforge.settings import ServiceSettings


class Scheduler(Service[ServiceSettings]):
    """A stand-in stage on the scheduler's subjects: records what it was handed."""

    name = ServiceName.SCHEDULER
    calls: list[str]

    def __init__(self, settings: ServiceSettings, bus: Bus) -> None:
        super().__init__(settings, bus)
        self.calls = []

    @subscriber(subjects.DATASET_PREPARED, cache_outputs=(ev.TrainingScheduled,))
    async def on_prepared(self, event: ev.DatasetPrepared, delivery: Delivery
                          ) -> ev.TrainingScheduled:
        self.calls.append(event.run_id)
        logging.getLogger("lmforge.test").info("planning")
        if event.seq_len == 0:
            raise BadInput("seq_len 0 cannot be trained; prepare the data with a seq_len >= 16")
        if event.seq_len < 0:
            raise RuntimeError("disk on fire")
        return ev.TrainingScheduled(run_id=event.run_id, model_name=event.model_name,
                                    dataset=event.dataset)


def _prepared(run_id: str, seq_len: int = 64, digest: str = "sha256:aa") -> ev.DatasetPrepared:
    return ev.DatasetPrepared(run_id=run_id, model_name="m", seq_len=seq_len,
                              dataset=ev.ArtifactRef(digest=digest))


def test_handler_output_is_published_and_a_republish_is_a_no_op(harness, tmp_path):
    async def scenario():
        async with harness.service(Scheduler, home=tmp_path) as service:
            event = _prepared("r1")
            await harness.publish(event, "r1:prepared")
            await harness.publish(event, "r1:prepared")  # deduplicated by the bus
            (out,) = await harness.wait_for(subjects.TRAINING_SCHEDULED, 1)
            (headers,) = await harness.headers(subjects.TRAINING_SCHEDULED, "r1")
            # Published again with a new msg id: the stage record makes it a no-op.
            await harness.publish(event, "r1:prepared-again")
            assert await harness.count(subjects.TRAINING_SCHEDULED) == 1
            return out, headers, service.calls

    out, headers, calls = asyncio.run(scenario())
    assert out.run_id == "r1"
    assert headers[Header.RUN_ID] == "r1" and "traceparent" in headers
    assert calls == ["r1"]


def test_same_inputs_under_a_new_run_replay_the_outputs_without_running(harness, tmp_path):
    async def scenario():
        async with harness.service(Scheduler, home=tmp_path) as service:
            await harness.publish(_prepared("first"), "first")
            await harness.wait_for(subjects.TRAINING_SCHEDULED, 1, run_id="first")
            await harness.publish(_prepared("second"), "second")
            (again,) = await harness.wait_for(subjects.TRAINING_SCHEDULED, 1, run_id="second")
            (headers,) = await harness.headers(subjects.TRAINING_SCHEDULED, "second")
            await harness.publish(_prepared("third", digest="sha256:bb"), "third")
            await harness.wait_for(subjects.TRAINING_SCHEDULED, 1, run_id="third")
            return again, headers, service.calls

    again, headers, calls = asyncio.run(scenario())
    assert again.run_id == "second" and again.dataset.digest == "sha256:aa"
    assert headers[Header.CACHED_FROM] == "first"
    assert calls == ["first", "third"]  # a changed input digest runs the stage


def test_malformed_message_is_dead_lettered_and_service_keeps_serving(harness, tmp_path):
    async def scenario():
        async with harness.service(Scheduler, home=tmp_path) as service:
            name = subjects.DATASET_PREPARED.name
            await harness.publish_raw(name, b"\xff\xff\xff not protobuf",
                                      {Header.RUN_ID: "bad", Header.MSG_ID: "bad"})
            await harness.publish_raw(name, b"", {Header.SCHEMA: "99", Header.RUN_ID: "future",
                                                  Header.MSG_ID: "future"})
            failed = await harness.wait_for(subjects.STAGE_FAILED, 2)
            dead = await harness.dead_letters("scheduler")
            await harness.publish(_prepared("good"), "good")
            await harness.wait_for(subjects.TRAINING_SCHEDULED, 1, run_id="good")
            return {f.run_id: f for f in failed}, dead, service.calls

    reasons, dead, calls = asyncio.run(scenario())
    assert reasons["bad"].dead_lettered
    assert "not a valid DatasetPrepared" in reasons["bad"].reason
    assert "schema version '99'" in reasons["future"].reason
    assert dead[0][1][Header.ORIGINAL_SUBJECT] == subjects.DATASET_PREPARED.name
    assert dead[0][0].startswith(b"\xff")
    assert calls == ["good"]


def test_bad_input_fails_once_and_a_crash_is_retried_then_dead_lettered(harness, tmp_path):
    async def scenario():
        async with harness.service(Scheduler, home=tmp_path, max_deliver=3) as service:
            await harness.publish(_prepared("bad-input", seq_len=0), "a")
            await harness.publish(_prepared("crashes", seq_len=-1), "b")
            failed = await harness.wait_for(subjects.STAGE_FAILED, 2, timeout=60)
            return {f.run_id: f for f in failed}, service.calls

    by_run, calls = asyncio.run(scenario())
    assert by_run["bad-input"].reason.startswith("seq_len 0 cannot be trained")
    assert not by_run["bad-input"].dead_lettered
    assert by_run["crashes"].dead_lettered and by_run["crashes"].deliveries == 3
    assert "disk on fire" in by_run["crashes"].reason
    assert calls.count("bad-input") == 1 and calls.count("crashes") == 3


def test_run_id_reaches_every_log_line_of_the_handler(harness, tmp_path, caplog):
    from lmforge.telemetry import JsonLogFormatter

    async def scenario():
        async with harness.service(Scheduler, home=tmp_path):
            await harness.publish(_prepared("logged"), "logged")
            await harness.wait_for(subjects.TRAINING_SCHEDULED, 1, run_id="logged")

    with caplog.at_level(logging.INFO, logger="lmforge.test"):
        asyncio.run(scenario())
    (record,) = [r for r in caplog.records if r.getMessage() == "planning"]
    assert '"run_id": "logged"' in JsonLogFormatter("test").format(record)


def test_a_handler_for_a_subject_the_catalog_does_not_give_the_service_is_refused(tmp_path):
    class Confused(Service[ServiceSettings]):
        name = ServiceName.QUANTIZER

        @subscriber(subjects.DATASET_READY)
        async def on_ready(self, event: ev.DatasetReady, delivery: Delivery) -> None:
            return None

    from lmforge.testing import InMemoryBroker

    service = Confused(ServiceSettings(home=tmp_path), InMemoryBroker().bus("quantizer"))
    with pytest.raises(TypeError, match=r"lmforge\.dataset\.ready"):
        service.subscriptions()


@pytest.mark.connected
def test_a_publish_during_a_nats_restart_waits_for_the_server(nats_server, caplog):
    """The handler's output is not lost when the server restarts under it (issue 9)."""
    from lmforge.bus import EventBus

    async def scenario():
        bus = EventBus("trainer")
        await bus.connect(nats_server.url)
        nats_server.kill()
        await asyncio.sleep(0.5)
        publishing = asyncio.create_task(bus.publish(
            ev.TrainingProgress(run_id="outage", step=7), msg_id="outage:7", retry_for_s=1.0))
        await asyncio.sleep(3.0)  # well past retry_for_s while the server is down
        assert not publishing.done()
        nats_server.start()  # the same port and store
        await asyncio.wait_for(publishing, 30)
        info = await bus.js.stream_info(subjects.STREAM,
                                        subjects_filter=subjects.TRAINING_PROGRESS.name)
        await bus.close()
        return (info.state.subjects or {}).get(subjects.TRAINING_PROGRESS.name, 0)

    with caplog.at_level(logging.WARNING, logger="lmforge.bus"):
        assert asyncio.run(scenario()) == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "lmforge.bus"]
    assert sum("lost the connection" in line for line in lines) == 1
    assert sum("reconnected" in line for line in lines) == 1
    assert not any(r.exc_info for r in caplog.records if r.name == "lmforge.bus")


def test_connecting_to_a_dead_url_gives_up_at_the_deadline():
    from lmforge.bus import EventBus
    from lmforge.runtime.nats_server import free_port

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ConnectionError, match="cannot reach NATS"):
            await EventBus("trainer").connect(f"nats://127.0.0.1:{free_port()}",
                                              connect_timeout_s=1.5)
        return loop.time() - started

    assert asyncio.run(scenario()) < 5
