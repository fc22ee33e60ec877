"""The autoscaler's loop against a real nats-server: two training runs waiting on the
trainer's consumer make it ask for a second trainer (issue 9: runs ran one by one)."""

from __future__ import annotations

import asyncio

import pytest
from nats.js import api

from lmforge.contracts import subjects
from lmforge.contracts.names import ServiceName, durable_name
from lmforge.contracts.v1 import events_pb2 as ev
from services.cost_autoscaler.handlers import AutoscalerService
from tests.buses import NatsHarness

pytestmark = pytest.mark.connected


def test_two_queued_training_runs_scale_the_trainer_to_two(nats_server, tmp_path):
    harness = NatsHarness(nats_server.url)
    durable = durable_name(ServiceName.TRAINER, subjects.TRAINING_SCHEDULED)

    async def scenario() -> ev.ScalingDecided:
        client = await harness.client()
        # The trainer's durable consumer, as the trainer creates it (no trainer runs).
        await client.js.pull_subscribe(
            subjects.TRAINING_SCHEDULED.name, durable=durable, stream=subjects.STREAM,
            config=api.ConsumerConfig(durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT,
                                      filter_subject=subjects.TRAINING_SCHEDULED.name))
        for run_id in ("one", "two"):
            await harness.publish(ev.TrainingScheduled(run_id=run_id), f"{run_id}:scheduled")
        async with harness.service(AutoscalerService, home=tmp_path, autoscaler_interval_s=0.2,
                                   autoscaler_max_replicas=2):
            # The backlog is there before the first round: the first decision has it.
            (decided,) = await harness.wait_for(subjects.SCALING_DECIDED, 1)
            return decided

    decision = asyncio.run(scenario())
    trainer = {s.service: s for s in decision.services}["trainer"]
    assert (trainer.replicas, trainer.reason, trainer.pinned) == (2, "backlog 2", False)
