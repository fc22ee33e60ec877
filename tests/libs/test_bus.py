"""The bus against a real nats-server: delivery, dedup, dead letters, idempotency."""

from __future__ import annotations

import asyncio

import pytest

from lmforge.bus import EventBus, StageError
from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev

pytestmark = pytest.mark.connected


async def _collect(bus: EventBus, subject: subjects.Subject, n: int, timeout: float = 10):
    """Read the first n events on `subject` from the stream with an ephemeral consumer."""
    sub = await bus.js.subscribe(subject.name, ordered_consumer=True)
    out = []
    try:
        while len(out) < n:
            msg = await sub.next_msg(timeout=timeout)
            out.append((subject.decode(msg.data), dict(msg.headers or {})))
    finally:
        await sub.unsubscribe()
    return out


async def _stream_count(bus: EventBus, subject: subjects.Subject) -> int:
    info = await bus.js.stream_info(subjects.STREAM, subjects_filter=subject.name)
    return (info.state.subjects or {}).get(subject.name, 0)


def test_handler_output_is_published_and_duplicates_are_dropped(nats_server):
    async def scenario():
        producer = EventBus("cli")
        await producer.connect(nats_server.url)
        consumer = EventBus("scheduler")
        await consumer.connect(nats_server.url)
        calls = []

        @consumer.subscriber(subjects.DATASET_PREPARED)
        async def on_prepared(event, delivery):
            calls.append(event.run_id)
            return ev.TrainingScheduled(run_id=event.run_id, model_name=event.model_name)

        await consumer.start()
        event = ev.DatasetPrepared(run_id="r1", model_name="m")
        await producer.publish(event, msg_id="r1:prepared")
        await producer.publish(event, msg_id="r1:prepared")  # deduplicated by the server
        got = await _collect(producer, subjects.TRAINING_SCHEDULED, 1)
        assert got[0][0].run_id == "r1"
        assert got[0][1]["Lmforge-Run-Id"] == "r1"
        assert "traceparent" in got[0][1]
        # Published again outside the dedup window (new msg id): the stage record
        # makes it a no-op.
        await producer.publish(event, msg_id="r1:prepared-again")
        await asyncio.sleep(0.5)
        assert calls == ["r1"]
        assert await _stream_count(producer, subjects.TRAINING_SCHEDULED) == 1
        await consumer.close()
        await producer.close()

    asyncio.run(scenario())


def test_malformed_message_is_dead_lettered_and_service_keeps_serving(nats_server):
    async def scenario():
        bus = EventBus("data-prep")
        await bus.connect(nats_server.url)
        handled = []

        @bus.subscriber(subjects.DATASET_READY)
        async def on_ready(event, delivery):
            handled.append(event.run_id)

        await bus.start()
        await bus.js.publish(subjects.DATASET_READY.name, b"\xff\xff\xff not protobuf",
                             headers={"Lmforge-Run-Id": "bad"})
        await bus.js.publish(subjects.DATASET_READY.name, b"",
                             headers={"Lmforge-Schema": "99", "Lmforge-Run-Id": "future"})
        failed = await _collect(bus, subjects.STAGE_FAILED, 2)
        reasons = {f.run_id: f for f, _ in failed}
        assert reasons["bad"].dead_lettered and "not a valid DatasetReady" in reasons["bad"].reason
        assert "schema version '99'" in reasons["future"].reason
        dead = await bus.js.subscribe("lmforge.deadletter.data-prep", ordered_consumer=True)
        msg = await dead.next_msg(timeout=5)
        assert msg.headers["Lmforge-Original-Subject"] == subjects.DATASET_READY.name
        assert msg.data.startswith(b"\xff")
        # Still serving.
        await bus.publish(ev.DatasetReady(run_id="good"), msg_id="good")
        for _ in range(50):
            if handled:
                break
            await asyncio.sleep(0.1)
        assert handled == ["good"]
        await bus.close()

    asyncio.run(scenario())


def test_stage_error_fails_once_and_crash_is_retried_then_dead_lettered(nats_server):
    async def scenario():
        bus = EventBus("trainer", ack_wait_s=2, max_deliver=3)
        await bus.connect(nats_server.url)
        attempts = {"bad-input": 0, "crashes": 0}

        @bus.subscriber(subjects.TRAINING_SCHEDULED)
        async def on_scheduled(event, delivery):
            attempts[event.run_id] += 1
            if event.run_id == "bad-input":
                raise StageError("plan asks for 0 steps")
            raise RuntimeError("disk on fire")

        await bus.start()
        await bus.publish(ev.TrainingScheduled(run_id="bad-input"), msg_id="a")
        await bus.publish(ev.TrainingScheduled(run_id="crashes"), msg_id="b")
        failed = await _collect(bus, subjects.STAGE_FAILED, 2, timeout=30)
        by_run = {f.run_id: f for f, _ in failed}
        assert by_run["bad-input"].reason == "plan asks for 0 steps"
        assert not by_run["bad-input"].dead_lettered
        assert by_run["crashes"].dead_lettered and by_run["crashes"].deliveries == 3
        assert "disk on fire" in by_run["crashes"].reason
        assert attempts == {"bad-input": 1, "crashes": 3}
        await bus.close()

    asyncio.run(scenario())
