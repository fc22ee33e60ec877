"""While JetStream has no leader for a stream (a cluster electing one after its leader
was killed, a restarted server recovering), a publish is answered "no responders"
(nats-py's NoStreamResponseError). The bus retries it, and a stage record's put, until
the stream answers again, instead of failing the handler and redoing its work."""

from __future__ import annotations

import asyncio

import pytest

from lmforge.bus import EventBus, ensure_kv, ensure_streams
from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket
from lmforge.contracts.v1 import events_pb2 as ev

pytestmark = pytest.mark.connected


def test_a_publish_without_a_stream_leader_waits_for_one(nats_server) -> None:
    async def scenario() -> int:
        bus = EventBus("trainer")
        await bus.connect(nats_server.url)
        try:
            await bus.js.delete_stream(subjects.STREAM)  # nobody answers for the subject
            publishing = asyncio.create_task(
                bus.publish(ev.ModelTrained(run_id="r1"), msg_id="r1:trained"))
            await asyncio.sleep(1.0)
            assert not publishing.done(), publishing
            await ensure_streams(bus.js)  # a leader again
            await asyncio.wait_for(publishing, 10)
            info = await bus.js.stream_info(subjects.STREAM)
            return info.state.messages
        finally:
            await bus.close(grace_s=1)

    assert asyncio.run(scenario()) == 1


def test_a_stage_record_put_without_a_leader_waits_for_one(nats_server) -> None:
    async def scenario() -> bytes | None:
        bus = EventBus("trainer")
        await bus.connect(nats_server.url)
        try:
            records = bus.key_value(Bucket.STAGE_RECORDS)
            await records.put("first", b"done")
            await bus.js.delete_stream(f"KV_{Bucket.STAGE_RECORDS}")
            putting = asyncio.create_task(records.put("second", b"done"))
            await asyncio.sleep(1.0)
            assert not putting.done(), putting
            await ensure_kv(bus.js, Bucket.STAGE_RECORDS)
            await asyncio.wait_for(putting, 10)
            return await records.get("second")
        finally:
            await bus.close(grace_s=1)

    assert asyncio.run(scenario()) == b"done"
