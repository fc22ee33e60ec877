"""Garbage on every subject a service consumes: dead-lettered, reported, still serving."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from lmforge.bus import EventBus
from lmforge.contracts import subjects
from lmforge.contracts.names import CONSUMES, Header
from services.cost_autoscaler.handlers import AutoscalerService
from services.data_prep.handlers import DataPrepService
from services.exporter.handlers import ExporterService
from services.inference_gateway.handlers import GatewayService
from services.quantizer.handlers import QuantizerService
from services.scheduler.handlers import SchedulerService
from services.trainer.handlers import TrainerService
from tests.helpers import in_process_service, wait_for_events

pytestmark = pytest.mark.connected

CONSUMED = {(service, subject) for service, consumed in CONSUMES.items() for subject in consumed}


def test_malformed_events_on_every_consumed_subject(nats_server, tmp_path):
    services = [DataPrepService, SchedulerService, TrainerService, QuantizerService,
                ExporterService, GatewayService, AutoscalerService]

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            for service in services:
                extra = {"gateway_port": 0} if service is GatewayService else {}
                await stack.enter_async_context(in_process_service(
                    service, nats_server.url, home=tmp_path, data_roots=[tmp_path], **extra))
            bus = EventBus("attacker")
            await bus.connect(nats_server.url)
            for i, subject in enumerate({subject for _, subject in CONSUMED}):
                # A truncated varint: never a valid protobuf message.
                await bus.js.publish(subject.for_tenant(""), b"\x0a\xff\xff\xff",
                                     headers={Header.RUN_ID: f"poison-{i}"})
            expected = len(CONSUMED)  # model.trained is consumed twice
            failed = await wait_for_events(nats_server.url, subjects.STAGE_FAILED, expected,
                                           timeout=60)
            dead = await bus.js.stream_info(subjects.DEAD_LETTER_STREAM)
            await bus.close()
            return failed, dead.state.messages

    failed, dead_letters = asyncio.run(scenario())
    by_stage = {(f.stage, f.subject) for f in failed}
    assert by_stage == {(service.value, subject.name) for service, subject in CONSUMED}
    assert all(f.dead_lettered and "not a valid" in f.reason for f in failed)
    assert dead_letters == len(failed)
