"""A run id is the tenant's that first used it: another tenant's dataset.ready under it
fails once with the reason, before any work; the owner (and an open deployment, whose
runs have no tenant) goes on as before. The same on a secured nats-server, with the CLI
and the cost ledger: tests/libs/test_run_id_takeover.py."""

from __future__ import annotations

import asyncio

from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket, Header
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import Delivery, Outcome, Subscription, event_headers
from lmforge.run_owners import owner_key
from lmforge.testing import InMemoryBroker

DURABLE = "data-prep__dataset_ready"


def _run(published: list[tuple[str, str, str]]
         ) -> tuple[list[tuple[str, str]], list[tuple[ev.StageFailed, dict[str, str]]],
                    list[Outcome], InMemoryBroker]:
    """Deliver each (tenant, run id, dataset uri) as dataset.ready on the tenant's subject,
    each under its own message id; the (tenant, run id)s the handler worked on, the
    stage.failed events with their headers, and the outcomes."""
    worked: list[tuple[str, str]] = []

    async def handle(event: ev.DatasetReady, delivery: Delivery) -> ev.DatasetPrepared:
        worked.append((delivery.tenant, event.run_id))
        return ev.DatasetPrepared(run_id=event.run_id)

    async def scenario() -> tuple[list[tuple[ev.StageFailed, dict[str, str]]], list[Outcome],
                                  InMemoryBroker]:
        broker = InMemoryBroker()
        bus = broker.bus("data-prep")
        bus.subscribe(Subscription(subject=subjects.DATASET_READY, handler=handle,  # type: ignore[arg-type]
                                   durable=DURABLE, ack_wait_s=5, max_deliver=2))
        await bus.start()
        for n, (tenant, run_id, uri) in enumerate(published):
            event = ev.DatasetReady(run_id=run_id, tenant=tenant, dataset_uri=uri)
            await broker.append(subjects.DATASET_READY.for_tenant(tenant),
                                event.SerializeToString(),
                                event_headers(event, msg_id=f"publish-{n}"))
        await broker.settled(timeout=10)
        outcomes = list(broker._consumers[DURABLE].outcomes)
        failed = [(m.decode(subjects.STAGE_FAILED), m.headers)
                  for m in broker.messages(subjects.STAGE_FAILED)]
        await broker.close()
        return failed, outcomes, broker

    failed, outcomes, broker = asyncio.run(scenario())
    return worked, failed, outcomes, broker


def test_another_tenants_run_id_fails_the_run_once_with_the_reason_and_does_no_work() -> None:
    worked, failed, outcomes, broker = _run([("globex", "g1", "/data/globex"),
                                             ("acme", "g1", "/data/acme")])
    assert worked == [("globex", "g1")]
    assert outcomes == [Outcome.OK, Outcome.FAILED]
    ((stage_failed, headers),) = failed
    assert stage_failed.run_id == "g1" and not stage_failed.dead_lettered
    assert "run id 'g1' belongs to another tenant's run" in stage_failed.reason
    assert "--run-id" in stage_failed.reason
    assert "globex" not in stage_failed.reason  # the owner is not named to acme
    # acme reads its failure (its tenant's event); globex's run shows no failure
    assert headers[Header.TENANT] == "acme"
    assert broker.buckets[Bucket.RUN_OWNERS].entries[owner_key("g1")] == \
        b'{"run_id": "g1", "tenant": "globex"}'


def test_the_owner_starts_runs_under_its_run_id_again() -> None:
    worked, failed, outcomes, _ = _run([("acme", "a1", "/data/v1"), ("acme", "a1", "/data/v2")])
    assert worked == [("acme", "a1"), ("acme", "a1")] and not failed
    assert outcomes == [Outcome.OK, Outcome.OK]


def test_an_open_deployment_reuses_run_ids_as_before() -> None:
    worked, failed, _, _ = _run([("", "r1", "/data/v1"), ("", "r1", "/data/v2")])
    assert worked == [("", "r1"), ("", "r1")] and not failed


def test_a_run_id_used_without_a_tenant_is_not_handed_to_a_tenant() -> None:
    """A deployment that turns tenants on keeps its earlier runs' ids (and cost entries)
    from the first tenant that names one."""
    worked, failed, _, _ = _run([("", "r1", "/data/v1"), ("acme", "r1", "/data/v1")])
    assert worked == [("", "r1")]
    ((stage_failed, headers),) = failed
    assert "belongs to another tenant's run" in stage_failed.reason
    assert headers[Header.TENANT] == "acme"


def test_two_tenants_same_failure_under_one_run_id_are_two_events_each_its_tenants() -> None:
    """The id of stage.failed holds the tenant: globex's failure is not taken for a repeat
    of acme's (the stream would drop it, and globex would never learn why)."""
    worked, failed, _, _ = _run([("acme", "a/b", "/x"), ("globex", "a/b", "/x")])
    assert worked == []
    assert [h[Header.TENANT] for _, h in failed] == ["acme", "globex"]
    assert all("path separators" in f.reason and f.dead_lettered for f, _ in failed)
