"""What the autoscaler observes, read from a real nats-server."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.js import api

from lmforge.bus import ensure_streams
from lmforge.contracts import subjects
from lmforge.contracts.names import ServiceName, durable_name
from services.cost_autoscaler.observing import consumer_backlogs

pytestmark = pytest.mark.connected


def test_backlog_is_counted_for_the_service_that_owns_each_consumer(nats_server):
    consumers = {
        durable_name(ServiceName.DATA_PREP, subjects.DATASET_READY): subjects.DATASET_READY,
        durable_name(ServiceName.SCHEDULER, subjects.DATASET_PREPARED):
            subjects.DATASET_PREPARED,
        durable_name(ServiceName.SCHEDULER, subjects.TRAINING_PREEMPTED):
            subjects.TRAINING_PREEMPTED,
        # Every gateway replica has its own durable (each loads every model).
        durable_name(ServiceName.INFERENCE_GATEWAY, subjects.MODEL_EXPORTED, replica=0):
            subjects.MODEL_EXPORTED,
        durable_name(ServiceName.INFERENCE_GATEWAY, subjects.MODEL_EXPORTED, replica=1):
            subjects.MODEL_EXPORTED,
        # Readers no service owns, whatever their names look like.
        "test-reader": subjects.DATASET_READY,
        "trainer__audit": subjects.TRAINING_SCHEDULED,
    }
    published = {subjects.DATASET_READY: 3, subjects.DATASET_PREPARED: 2,
                 subjects.TRAINING_PREEMPTED: 1, subjects.MODEL_EXPORTED: 2,
                 subjects.TRAINING_SCHEDULED: 4}

    async def scenario() -> dict[ServiceName, int]:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await ensure_streams(js)
            for durable, subject in consumers.items():
                await js.add_consumer(subjects.STREAM, api.ConsumerConfig(
                    durable_name=durable, filter_subject=subject.pattern,
                    ack_policy=api.AckPolicy.EXPLICIT, deliver_policy=api.DeliverPolicy.ALL))
            for subject, count in published.items():
                for _ in range(count):
                    await js.publish(subject.for_tenant(""), b"")
            # One dataset.ready is in hand (delivered, not yet acked): still backlog.
            data_prep = await js.pull_subscribe(
                subjects.DATASET_READY.pattern, stream=subjects.STREAM,
                durable=durable_name(ServiceName.DATA_PREP, subjects.DATASET_READY))
            assert len(await data_prep.fetch(1, timeout=5)) == 1
            return await consumer_backlogs(js)
        finally:
            await nc.close()

    backlog = asyncio.run(scenario())
    assert backlog == {ServiceName.DATA_PREP: 3, ServiceName.SCHEDULER: 3,
                       ServiceName.INFERENCE_GATEWAY: 4}
