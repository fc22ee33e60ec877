"""dataset.ready names its tenant in the subject, and the consumer believes only the subject.

The NATS permission on `lmforge.dataset.ready.<tenant>` decides who may publish for a
tenant (tests/libs/test_nats_security.py); these pin the other half: the dispatcher takes
the tenant from the subject the message arrived on, never from the header or the body a
publisher wrote, and refuses an event whose body names another tenant.
"""

from __future__ import annotations

import asyncio

import pytest

from lmforge.contracts import subjects
from lmforge.contracts.names import Header
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import Delivery, Outcome, Subscription, event_headers
from lmforge.testing import InMemoryBroker


def test_dataset_ready_is_published_on_its_tenants_subject() -> None:
    ready = subjects.DATASET_READY
    assert ready.for_tenant("acme") == "lmforge.dataset.ready.acme"
    assert ready.for_tenant("") == f"lmforge.dataset.ready.{subjects.NO_TENANT}"
    assert ready.pattern == "lmforge.dataset.ready.*"
    assert ready.tenant_of("lmforge.dataset.ready.acme") == "acme"
    assert ready.tenant_of(ready.for_tenant("")) == ""
    assert subjects.by_name("lmforge.dataset.ready.acme") is ready
    # subjects that carry no tenant are what they were
    assert subjects.MODEL_TRAINED.for_tenant("acme") == subjects.MODEL_TRAINED.name
    assert subjects.MODEL_TRAINED.pattern == subjects.MODEL_TRAINED.name


@pytest.mark.parametrize("tenant", ["a.b", "*", ">", "acme.>", "Acme", "a b", "_", "-x"])
def test_a_tenant_that_is_not_one_subject_token_is_refused(tenant: str) -> None:
    with pytest.raises(ValueError, match="must be 1-63 of a-z"):
        subjects.DATASET_READY.for_tenant(tenant)


def test_an_unscoped_subject_does_not_resolve_with_a_suffix() -> None:
    with pytest.raises(KeyError):
        subjects.by_name("lmforge.model.trained.acme")


def _run(published: list[tuple[str, ev.DatasetReady, dict[str, str]]]
         ) -> tuple[list[str], list[ev.StageFailed], list[Outcome]]:
    """Deliver each (subject, event, extra headers) to a dataset.ready handler; what it saw."""
    seen: list[str] = []

    async def handle(event: ev.DatasetReady, delivery: Delivery) -> ev.DatasetPrepared:
        seen.append(delivery.tenant)
        return ev.DatasetPrepared(run_id=event.run_id)

    async def scenario() -> tuple[list[ev.StageFailed], list[Outcome]]:
        broker = InMemoryBroker()
        bus = broker.bus("data-prep")
        bus.subscribe(Subscription(subject=subjects.DATASET_READY,
                                   handler=handle,  # type: ignore[arg-type]
                                   durable="data-prep__dataset_ready", ack_wait_s=5,
                                   max_deliver=2))
        await bus.start()
        for subject, event, extra in published:
            await broker.append(subject, event.SerializeToString(),
                                event_headers(event, msg_id=f"{event.run_id}:ready",
                                              extra=extra))
        await broker.settled(timeout=10)
        outcomes = list(broker._consumers["data-prep__dataset_ready"].outcomes)
        failed = broker.events(subjects.STAGE_FAILED)
        await broker.close()
        return failed, outcomes

    failed, outcomes = asyncio.run(scenario())
    return seen, failed, outcomes


def test_the_tenant_comes_from_the_subject_not_from_a_forged_header() -> None:
    event = ev.DatasetReady(run_id="r1", tenant="acme")
    seen, failed, outcomes = _run([("lmforge.dataset.ready.acme", event,
                                    {Header.TENANT: "globex"})])
    assert seen == ["acme"] and not failed and outcomes == [Outcome.OK]


def test_a_body_naming_another_tenant_fails_the_run_once_and_does_no_work() -> None:
    forged = ev.DatasetReady(run_id="forged", tenant="globex")
    seen, failed, outcomes = _run([("lmforge.dataset.ready.acme", forged, {})])
    assert seen == [] and outcomes == [Outcome.FAILED]
    (stage_failed,) = failed
    assert stage_failed.run_id == "forged" and not stage_failed.dead_lettered
    assert "tenant mismatch" in stage_failed.reason and "'globex'" in stage_failed.reason
    assert "lmforge.dataset.ready.acme" in stage_failed.reason


def test_an_untenanted_run_is_one_on_the_no_tenant_subject() -> None:
    seen, failed, _ = _run([(subjects.DATASET_READY.for_tenant(""),
                             ev.DatasetReady(run_id="open"), {Header.TENANT: "acme"})])
    assert seen == [""] and not failed


@pytest.mark.connected
def test_a_store_from_before_the_tenant_token_is_moved_onto_it(nats_server) -> None:
    """An upgraded store: the stream held bare `lmforge.dataset.ready` and data-prep's
    durable filtered on it. Starting the new build moves both, and the durable consumes
    a tenant's dataset.ready instead of waiting forever on a subject nobody publishes."""
    import nats
    from nats.js import api

    from lmforge.bus import EventBus, ensure_streams
    from lmforge.contracts.names import ServiceName, durable_name

    durable = durable_name(ServiceName.DATA_PREP, subjects.DATASET_READY)
    seen = asyncio.Event()

    async def handle(event: ev.DatasetReady, delivery: Delivery) -> None:
        seen.set()

    async def scenario() -> str:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await js.add_stream(api.StreamConfig(name=subjects.STREAM, subjects=[
            s.name for s in subjects.ALL], storage=api.StorageType.FILE))
        await js.add_consumer(subjects.STREAM, api.ConsumerConfig(
            durable_name=durable, filter_subject=subjects.DATASET_READY.name,
            ack_policy=api.AckPolicy.EXPLICIT))
        bus = EventBus(ServiceName.DATA_PREP)
        await bus.connect(nats_server.url, connect_timeout_s=5)  # updates the stream
        bus.subscribe(Subscription(subject=subjects.DATASET_READY,
                                   handler=handle,  # type: ignore[arg-type]
                                   durable=durable, ack_wait_s=5, max_deliver=2))
        try:
            await bus.start()
            await ensure_streams(js)
            await bus.publish(ev.DatasetReady(run_id="upgraded", tenant="acme"),
                              msg_id="upgraded:ready")
            await asyncio.wait_for(seen.wait(), 10)
            return str((await js.consumer_info(subjects.STREAM, durable)).config.filter_subject)
        finally:
            await bus.close(grace_s=2)
            await nc.close()

    assert asyncio.run(scenario()) == subjects.DATASET_READY.pattern
