"""A NATS error while a message is handled (the stage-record bucket not answering, as
after a nats-server restart while JetStream recovers its streams) delays that message;
it does not end the subscription. It used to kill the fetch loop: the service stayed
`ready` and never consumed again."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest

from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket
from tests.buses import NatsHarness
from tests.libs.test_bus import Scheduler, _prepared

pytestmark = pytest.mark.connected


def test_a_stage_record_error_redelivers_the_event_and_the_service_keeps_consuming(
        nats_server, tmp_path) -> None:
    harness = NatsHarness(nats_server.url)

    async def scenario() -> list[str]:
        async with harness.service(Scheduler, home=tmp_path) as service:
            records = service.bus.key_value(Bucket.STAGE_RECORDS)
            real_get = records.get
            failures = [nats.errors.TimeoutError()]

            async def get_failing_once(key: str) -> bytes | None:
                if failures:
                    raise failures.pop()
                return await real_get(key)

            records.get = get_failing_once  # type: ignore[method-assign]
            await harness.publish(_prepared("r1"), "r1")
            await harness.publish(_prepared("r2", digest="sha256:bb"), "r2")
            found = await harness.wait_for(subjects.TRAINING_SCHEDULED, 2, timeout=30)
            assert not failures
            return sorted(e.run_id for e in found) + service.calls

    assert asyncio.run(scenario()) == ["r1", "r2", "r2", "r1"]
