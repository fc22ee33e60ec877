"""A tenant reads its own runs, costs and datasets and no other tenant's, enforced by the
nats-server: the CLI as acme shows acme's runs, and acme's credential on a raw
connection is refused the stream, the ledger and globex's query subject."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client

from lmforge.bus import EventBus, ensure_kv, ensure_streams
from lmforge.cli.main import main as lmforge_main
from lmforge.cli.runs import model_dataset
from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket, Header, ServiceName
from lmforge.contracts.tenant_queries import (
    BUSY,
    COST,
    EVENTS,
    MAX_REQUEST_BYTES,
    PAGE_BYTES,
    CostPage,
    EventsPage,
    EventsRequest,
    QueriedEvent,
    query_subject,
)
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.runtime.nats_server import NatsServer
from lmforge.security.nats_connect import NatsAuth
from lmforge.security.nats_secrets import NatsSecrets, add_tenant_client, ensure_nats_secrets
from services.cost_autoscaler.handlers import AutoscalerService
from services.cost_autoscaler.ledger import SERVING_KEY
from tests.helpers import in_process_service, serving_in_a_thread

pytestmark = pytest.mark.connected

T0 = 1_700_000_000 * 10**9
RUNS = {"acme": "a1", "globex": "g1"}
"""One run per tenant; acme also forges a run whose header names globex ("forged")."""
TOKENS = {"acme-model": 100.0, "globex-model": 200.0}
"""What the gateway generated per model (the serving entry), each tenant's model."""


def _auth(found: NatsSecrets, role: str = "", tenant: str = "") -> NatsAuth:
    path = found.client_path(tenant) if tenant else found.credential_path(role)
    return NatsAuth.from_files(path, found.tls.ca)


async def _publish_runs(url: str, found: NatsSecrets) -> None:
    """Each tenant starts its run; data-prep prepares both (the tenant header carried on,
    as services do); acme forges a globex header on a run of its own."""
    for tenant, run_id in RUNS.items():
        client = EventBus("cli")
        await client.connect(url, auth=_auth(found, tenant=tenant), connect_timeout_s=5)
        try:
            await client.publish(ev.DatasetReady(run_id=run_id, tenant=tenant,
                                                 model_name=f"{tenant}-model"),
                                 msg_id=f"{run_id}:ready")
            if tenant == "acme":
                await client.publish(ev.DatasetReady(run_id="forged", tenant="acme",
                                                     model_name="acme-model"),
                                     msg_id="forged:ready", headers={Header.TENANT: "globex"})
        finally:
            await client.close()
    data_prep = EventBus(ServiceName.DATA_PREP)
    await data_prep.connect(url, auth=_auth(found, ServiceName.DATA_PREP), connect_timeout_s=5)
    try:
        for tenant, run_id in RUNS.items():
            prepared = ev.DatasetPrepared(run_id=run_id, model_name=f"{tenant}-model",
                                          dataset=ev.ArtifactRef(digest=f"digest-{tenant}"))
            await data_prep.publish(prepared, msg_id=f"{run_id}:prepared", headers={
                Header.TENANT: tenant, Header.RUN_ID: run_id,
                Header.WORK_STARTED_NS: str(T0), Header.PUBLISHED_NS: str(T0 + 10**9)})
    finally:
        await data_prep.close()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, NatsSecrets]]:
    """A secured nats-server (acme's and globex's client credentials), both tenants' runs
    in it, and cost-autoscaler (its own credential) pricing them and answering queries."""
    root = tmp_path_factory.mktemp("tenant-reads")
    found = ensure_nats_secrets(root / "secrets")
    for tenant in (*RUNS, "initech", "hooli"):
        add_tenant_client(found, tenant)
    server = NatsServer(store_dir=root / "nats", log_file=root / "nats.log",
                        config_file=found.server_config, tls=True).start()
    async def prepare() -> None:  # what the supervisor does as admin
        nc = await nats.connect(server.url, **_auth(found, "admin").connect_options())
        await ensure_streams(nc.jetstream())
        for bucket in Bucket:
            await ensure_kv(nc.jetstream(), bucket)
        # served tokens so far (the autoscaler carries them on from here)
        ledger = await nc.jetstream().key_value(Bucket.COST_LEDGER)
        await ledger.put(SERVING_KEY, json.dumps({
            "hardware": "cpu", "usd_per_hour": 3600.0, "replica_seconds": 1.0,
            "cost_usd": 1.0, "tokens_by_model": TOKENS, "unknown_seconds": 0.0}).encode())
        await nc.close()

    @contextlib.asynccontextmanager
    async def autoscaler() -> AsyncIterator[None]:
        creds = found.credential_path(ServiceName.COST_AUTOSCALER)
        async with in_process_service(AutoscalerService, server.url, home=root / "home",
                                      nats_creds=creds, nats_ca=found.tls.ca,
                                      autoscaler_price_per_hour={"cpu": 3600.0}) as service:
            await _publish_runs(server.url, found)
            ledger = service.bus.key_value(Bucket.COST_LEDGER)
            for _ in range(200):
                if all([await ledger.get(run_id) for run_id in RUNS.values()]):
                    break
                await asyncio.sleep(0.05)
            yield

    asyncio.run(prepare())
    try:
        with serving_in_a_thread(autoscaler):
            yield server, found
    finally:
        server.stop()


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
         found: NatsSecrets, server: NatsServer, tenant: str, *argv: str) -> tuple[int, str]:
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "cli-home"))
    monkeypatch.setenv("LMFORGE_NATS_URL", server.url)
    monkeypatch.setenv("LMFORGE_NATS_CREDS", str(found.client_path(tenant)))
    monkeypatch.setenv("LMFORGE_NATS_CA", str(found.tls.ca))
    capsys.readouterr()
    code = lmforge_main(list(argv))
    return code, capsys.readouterr().out


@pytest.mark.parametrize("tenant", list(RUNS))
def test_the_cli_shows_a_tenant_only_its_own_runs_and_costs(secured, tenant, monkeypatch,
                                                             capsys, tmp_path) -> None:
    """Through cost-autoscaler's answers: the forged header does not move acme's run into
    globex's list (dataset.ready's tenant is its subject's)."""
    server, found = secured
    code, out = _cli(monkeypatch, capsys, tmp_path, found, server, tenant, "runs", "--json")
    assert code == 0
    mine = {"acme": {"a1", "forged"}, "globex": {"g1"}}[tenant]
    runs = {r["run_id"]: r for r in json.loads(out)}
    assert set(runs) == mine
    assert runs[RUNS[tenant]]["cost_usd"] == pytest.approx(1.0)  # 1 s at $3600/h
    assert runs[RUNS[tenant]]["stage"] == ServiceName.SCHEDULER  # dataset.prepared folded

    code, out = _cli(monkeypatch, capsys, tmp_path, found, server, tenant, "cost", "--json")
    assert code == 0
    assert set(json.loads(out)["runs"]) == {RUNS[tenant]}
    other = "globex" if tenant == "acme" else "acme"
    code, _ = _cli(monkeypatch, capsys, tmp_path, found, server, tenant, "cost", RUNS[other])
    assert code == 1

    from lmforge.cli.cost import read_ledger

    ledger, _serving = asyncio.run(read_ledger(server.url, auth=_auth(found, "admin")))
    assert set(ledger) == set(RUNS.values())  # the admin credential reads every entry


def test_every_reader_given_a_tenants_credential_gets_only_its_events(secured, monkeypatch,
                                                                       capsys, tmp_path) -> None:
    """What `runs`, `run --follow`, `report`, `search` and the status page read with the
    tenant's credential holds only its events, whatever filter its caller asks for (none
    here); `search` and `report` of globex's run and model find nothing as acme."""
    from lmforge.cli.runs import stream_events

    server, found = secured

    async def read(auth: NatsAuth) -> set[str]:
        return {str(getattr(event, "run_id", "")) async for _s, event, _t, _c
                in stream_events(server.url, idle_timeout_s=0.5, auth=auth)}

    assert asyncio.run(read(_auth(found, tenant="acme"))) == {"a1", "forged"}
    assert asyncio.run(read(_auth(found, tenant="globex"))) == {"g1"}
    # the admin credential reads the whole stream, as before (the autoscaler's decisions too)
    assert asyncio.run(read(_auth(found, "admin"))) >= {"a1", "g1", "forged"}
    assert asyncio.run(model_dataset(server.url, "globex-model",
                                     auth=_auth(found, tenant="globex"))) == "digest-globex"
    assert asyncio.run(model_dataset(server.url, "globex-model",
                                     auth=_auth(found, tenant="acme"))) == ""
    code, _ = _cli(monkeypatch, capsys, tmp_path, found, server, "acme",
                   "search", "globex-model", "anything")
    assert code == 1  # "no dataset was prepared for a model named 'globex-model'"
    code, _ = _cli(monkeypatch, capsys, tmp_path, found, server, "acme", "report", "g1",
                   "--json")
    assert code == 1  # "no events for run 'g1'"


def test_following_as_a_tenant_sees_its_new_events_and_no_one_elses(secured) -> None:
    """As `run --follow` and the status page do: events published after the follower
    started reach it, its own tenant's only (initech follows; umbrella's run, published
    in between, never shows)."""
    from lmforge.cli.runs import stream_events

    server, found = secured

    async def scenario() -> list[str]:
        seen: list[str] = []

        async def follow() -> None:
            async for _s, event, _t, _c in stream_events(
                    server.url, follow=True, idle_timeout_s=0.2,
                    auth=_auth(found, tenant="initech")):
                seen.append(str(getattr(event, "run_id", "")))
                if seen[-1] == "late-initech":
                    return

        follower = asyncio.create_task(follow())
        await asyncio.sleep(1.0)  # following, at the end of the stream
        data_prep = EventBus(ServiceName.DATA_PREP)
        await data_prep.connect(server.url, auth=_auth(found, ServiceName.DATA_PREP),
                                connect_timeout_s=5)
        try:
            for tenant in ("umbrella", "initech"):
                await data_prep.publish(ev.DatasetPrepared(run_id=f"late-{tenant}"),
                                        msg_id=f"late-{tenant}:prepared",
                                        headers={Header.TENANT: tenant})
        finally:
            await data_prep.close()
        await asyncio.wait_for(follower, 20)
        return seen

    assert asyncio.run(scenario()) == ["late-initech"]


@contextlib.asynccontextmanager
async def _raw(server: NatsServer, found: NatsSecrets, tenant: str
               ) -> AsyncIterator[tuple[Client, list[str]]]:
    """A raw connection with `tenant`'s credential, and the errors the server sent it."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    nc = await nats.connect(server.url, error_cb=on_error, allow_reconnect=False,
                            **_auth(found, tenant=tenant).connect_options())
    try:
        yield nc, errors
    finally:
        await nc.close()


def test_a_tenants_credential_cannot_read_the_event_stream(secured) -> None:
    server, found = secured

    async def attempt() -> list[str]:
        async with _raw(server, found, "acme") as (nc, errors):
            with pytest.raises((nats.errors.TimeoutError, nats.errors.Error)):
                sub = await nc.jetstream(timeout=0.5).subscribe(
                    "lmforge.>", ordered_consumer=True, stream=subjects.STREAM)
                await sub.next_msg(timeout=1)
            await nc.flush()
            return errors

    errors = asyncio.run(attempt())
    assert any("permissions violation" in e and f"consumer.create.{subjects.STREAM.lower()}"
               in e for e in errors), errors


def test_a_tenants_credential_cannot_read_the_cost_ledger(secured) -> None:
    server, found = secured

    async def attempt() -> list[str]:
        async with _raw(server, found, "acme") as (nc, errors):
            js = nc.jetstream(timeout=0.5)
            with pytest.raises((nats.errors.TimeoutError, nats.errors.Error)):
                kv = await js.key_value(Bucket.COST_LEDGER)
                await kv.get("g1")
            with pytest.raises((nats.errors.TimeoutError, nats.errors.Error)):
                await js.get_msg(f"KV_{Bucket.COST_LEDGER}", seq=1, direct=True)
            await nc.flush()
            return errors

    errors = asyncio.run(attempt())
    assert any("permissions violation" in e and f"kv_{Bucket.COST_LEDGER}" in e
               for e in errors), errors


def test_a_tenants_credential_cannot_ask_for_another_tenants_runs(secured) -> None:
    server, found = secured

    async def attempt() -> list[str]:
        async with _raw(server, found, "acme") as (nc, errors):
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await nc.request(query_subject(EVENTS, "globex"), b"{}", timeout=1)
            await nc.flush()
            # its own tenant's subject is answered
            assert (await nc.request(query_subject(EVENTS, "acme"), b"{}", timeout=10)).data
            return errors

    errors = asyncio.run(attempt())
    assert any("permissions violation for publish" in e
               and query_subject(EVENTS, "globex") in e for e in errors), errors


def test_a_long_history_comes_in_pages_under_the_servers_payload_limit(nats_server,
                                                                       tmp_path) -> None:
    """An open nats-server's default max_payload is 1 MiB: the answer is cut into pages
    below it (one reply too large is never sent and the asker would wait in vain), and
    the pages together hold every event of the tenant, once."""
    from lmforge.cli.tenant_reads import events_page
    from tests.buses import NatsHarness

    harness = NatsHarness(nats_server.url)
    count = 10000  # acme's half: ~1.5 MB of answer

    async def scenario() -> tuple[list[int], int, int]:
        client = await harness.client()
        async with harness.service(AutoscalerService, home=tmp_path):
            await asyncio.gather(*(client.publish(
                ev.TrainingProgress(run_id=f"r{i % 7}-{'x' * 200}", step=i), msg_id=f"p{i}",
                headers={Header.TENANT: "acme" if i % 2 else "globex"})
                for i in range(count)))
            nc = await nats.connect(nats_server.url)
            try:
                steps: list[int] = []
                pages, seq = 0, 1
                while True:
                    page = await events_page(nc, "acme", from_seq=seq)
                    pages += 1
                    steps += [subjects.TRAINING_PROGRESS.decode(e.data).step
                              for e in page.events]
                    seq = page.next_seq
                    if page.end:
                        return steps, pages, nc.max_payload
            finally:
                await nc.close()

    steps, pages, max_payload = asyncio.run(scenario())
    assert max_payload == 1 << 20 and pages >= 2
    assert sorted(steps) == list(range(1, count, 2))


def test_a_tenants_cost_answer_names_only_its_own_models(secured, monkeypatch, capsys,
                                                         tmp_path) -> None:
    """Serving is one deployment's: its totals are every tenant's, but its tokens per model
    name each tenant's models; acme's answer names acme's only, globex's globex's."""
    server, found = secured
    for tenant in RUNS:
        code, out = _cli(monkeypatch, capsys, tmp_path, found, server, tenant, "cost",
                         "--json")
        assert code == 0
        serving = json.loads(out)["serving"]
        assert serving["tokens_by_model"] == {f"{tenant}-model": TOKENS[f"{tenant}-model"]}
        assert serving["tokens"] == sum(TOKENS.values())  # the deployment's total
        code, out = _cli(monkeypatch, capsys, tmp_path, found, server, tenant, "cost")
        assert code == 0 and "tokens generated" in out
        assert "globex" not in out if tenant == "acme" else "acme" not in out


def test_a_tenants_credential_is_refused_the_event_streams_info_yet_runs_and_reads(
        secured, monkeypatch, capsys, tmp_path) -> None:
    """The stream's info counts messages per subject, `dataset.ready.<tenant>` among them:
    every tenant and how many runs it started. A tenant's credential is refused it; it still
    starts a run and reads it back (the CLI), and reads the dead-letter counts (the page)."""
    from lmforge.ui.feed import dead_letter_counts

    server, found = secured

    async def attempt() -> list[str]:
        async with _raw(server, found, "acme") as (nc, errors):
            with pytest.raises((nats.errors.TimeoutError, nats.errors.Error)):
                await nc.jetstream(timeout=1).stream_info(subjects.STREAM, subjects_filter=">")
            await nc.flush()
            return errors

    errors = asyncio.run(attempt())
    assert any("permissions violation" in e and f"stream.info.{subjects.STREAM.lower()}" in e
               for e in errors), errors
    assert isinstance(asyncio.run(dead_letter_counts(server.url, _auth(found, tenant="acme"))),
                      dict)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    code, out = _cli(monkeypatch, capsys, tmp_path, found, server, "hooli", "run", str(data),
                     "--model-name", "hooli-model", "--run-id", "h1", "--json")
    assert code == 0 and json.loads(out) == {"run_id": "h1"}
    code, out = _cli(monkeypatch, capsys, tmp_path, found, server, "hooli", "runs", "--json")
    assert code == 0 and [r["run_id"] for r in json.loads(out)] == ["h1"]


@pytest.mark.parametrize("kind", [EVENTS, COST])
def test_a_malformed_query_is_answered_with_its_error_at_once(secured, kind) -> None:
    """Not a 10 s wait for nothing: each body the responder cannot read gets an error that
    says why, and the responder goes on answering."""
    server, found = secured
    bodies = [b"[]", b'"x"', b"7", b"{", b"\xff", b"x" * (MAX_REQUEST_BYTES + 1)]
    bodies += ([b'{"from_seq": null}', b'{"from_seq": "3"}', b'{"from_seq": true}',
                b'{"run_id": 5}'] if kind == EVENTS else [b'{"after": 5}'])

    async def ask() -> list[str]:
        async with _raw(server, found, "acme") as (nc, _errors):
            errors = []
            for body in bodies:
                reply = await nc.request(query_subject(kind, "acme"), body, timeout=3)
                errors.append(json.loads(reply.data)["error"])
            reply = await nc.request(query_subject(kind, "acme"), b"{}", timeout=10)
            assert not json.loads(reply.data)["error"]
            return errors

    errors = asyncio.run(ask())
    assert all(errors) and not any(e.startswith(BUSY) for e in errors), errors


def test_a_burst_of_one_tenants_queries_is_answered_busy_while_another_tenant_is_served(
        secured) -> None:
    """A tenant has a couple of queries in hand at most: the rest of a burst is answered
    `busy` at once, globex's query in the middle of it is answered, and the CLI's reader
    (asking again after `busy`) gets every answer of a burst of its own."""
    from lmforge.cli.tenant_reads import events_page

    server, found = secured
    burst = 12

    async def scenario() -> tuple[list[str], EventsPage, list[EventsPage]]:
        async with _raw(server, found, "acme") as (acme, _), \
                _raw(server, found, "globex") as (globex, _):
            asks = [asyncio.ensure_future(acme.request(
                query_subject(EVENTS, "acme"), EventsRequest(1).encode(), timeout=10))
                for _ in range(burst)]
            globex_page = await events_page(globex, "globex", from_seq=1)
            errors = [EventsPage.decode(r.data).error for r in await asyncio.gather(*asks)]
            pages = await asyncio.gather(*(events_page(acme, "acme", from_seq=1)
                                           for _ in range(burst // 2)))
            return errors, globex_page, pages

    errors, globex_page, pages = asyncio.run(scenario())
    busy = [e for e in errors if e.startswith(BUSY)]
    assert busy and len(busy) < burst and len(busy) + errors.count("") == burst, errors
    assert {e.subject for e in globex_page.events} >= {"lmforge.dataset.ready.globex"}
    assert all(p.events and not p.error for p in pages)


def _acme(n: int) -> dict[str, str]:
    return {Header.TENANT: "acme", Header.MSG_ID: f"e{n}"}


def test_a_page_never_exceeds_its_budget_and_an_oversize_event_does_not_stall_the_feed(
        nats_server, tmp_path, caplog) -> None:
    """100 kB events fill a page to its budget and not past it (half an open server's 1 MiB
    max_payload); a 900 kB event, which no reply can hold once encoded, comes without its
    data, saying how large it was, and the events after it still come (the CLI's reader
    says it left one out)."""
    from lmforge.cli.runs import _queried_events
    from tests.buses import NatsHarness

    harness = NatsHarness(nats_server.url)
    sizes = [100_000] * 12 + [900_000] + [10] * 3
    subject = subjects.TRAINING_PROGRESS.name

    async def scenario() -> tuple[list[int], list[QueriedEvent], int, list[bytes]]:
        async with harness.service(AutoscalerService, home=tmp_path):
            for n, size in enumerate(sizes):
                await harness.publish_raw(subject, bytes([n]) * size, _acme(n))
            nc = await nats.connect(nats_server.url)
            try:
                replies, events, seq = [], [], 1
                while True:
                    reply = await nc.request(query_subject(EVENTS, "acme"),
                                             EventsRequest(seq).encode(), timeout=10)
                    replies.append(len(reply.data))
                    page = EventsPage.decode(reply.data)
                    events += page.events
                    seq = page.next_seq
                    if page.end:
                        break
                shown = [data async for _s, data, _t, _h in _queried_events(
                    nc, "acme", [1], run_id="", follow=False, idle_timeout_s=0.1,
                    on_connection=None)]
                return replies, events, nc.max_payload, shown
            finally:
                await nc.close()

    replies, events, max_payload, shown = asyncio.run(scenario())
    assert max(replies) <= min(PAGE_BYTES, max_payload // 2) < max_payload, replies
    assert [e.omitted_bytes or len(e.data) for e in events] == sizes
    assert [e.omitted_bytes for e in events if e.omitted_bytes] == [900_000]
    assert [len(d) for d in shown] == [s for s in sizes if s != 900_000]
    assert "900000 bytes, more than one answer of cost-autoscaler holds" in caplog.text


def test_a_slow_read_of_the_stream_is_not_the_end_of_it(nats_server) -> None:
    """A page is sent as it is when the stream's next event is slow to come (here: the
    responder waits no time at all, so every page is cut at once); it says it is not the
    end unless it reached the last event, and once reads are quick again the pages asked
    for from there bring every event."""
    from lmforge.bus import EventBus
    from services.cost_autoscaler.tenant_queries import TenantQueries

    count = 3000

    async def scenario() -> tuple[list[EventsPage], int, list[int]]:
        bus = EventBus(ServiceName.COST_AUTOSCALER)
        await bus.connect(nats_server.url)
        try:
            await asyncio.gather(*(bus.js.publish(subjects.TRAINING_PROGRESS.name,
                                                  str(n).encode(), headers=_acme(n))
                                   for n in range(count)))
            last = (await bus.js.stream_info(subjects.STREAM)).state.last_seq
            assert bus.nc is not None
            slow = TenantQueries(bus.nc, bus.js, bus.key_value(Bucket.COST_LEDGER),
                                 read_timeout_s=1e-6)
            pages, seen, seq = [], [], 1
            for n in range(2000):
                if n == 20:
                    slow.read_timeout_s = 0.05
                page = await slow.events_page("acme", EventsRequest(seq))
                pages.append(page)
                seen += [int(e.data) for e in page.events]
                seq = page.next_seq
                if page.end:
                    break
            return pages, last, seen
        finally:
            await bus.close()

    pages, last, seen = asyncio.run(scenario())
    cut = [p for p in pages if p.next_seq <= last]
    assert cut, "no read was slow: the test shows nothing"
    assert not any(p.end for p in cut)
    assert pages[-1].end and sorted(seen) == list(range(count))


def test_the_cost_of_many_runs_comes_in_pages(nats_server, tmp_path) -> None:
    """1.6 MB of a tenant's ledger entries, more than an open server's 1 MiB max_payload:
    pages under half of it, together every entry of the tenant (and no one else's)."""
    from lmforge.cli.tenant_reads import tenant_costs
    from tests.buses import NatsHarness

    harness = NatsHarness(nats_server.url)
    runs: dict[str, dict[str, object]] = {
        f"r{n:04d}": {"run_id": f"r{n:04d}", "tenant": "acme" if n % 4 else "globex",
                      "model_name": "m", "charges": {}, "note": "x" * 2000,
                      "total_usd": float(n)} for n in range(1000)}

    async def scenario() -> tuple[dict[str, dict[str, object]], int]:
        async with harness.service(AutoscalerService, home=tmp_path):
            ledger = (await harness.client()).key_value(Bucket.COST_LEDGER)
            await asyncio.gather(*(ledger.put(run_id, json.dumps(entry).encode())
                                   for run_id, entry in runs.items()))
            nc = await nats.connect(nats_server.url)
            try:
                first = await nc.request(query_subject(COST, "acme"), b"", timeout=10)
                assert not CostPage.decode(first.data).end
                costs, _serving = await tenant_costs(nc, "acme")
                return costs, len(first.data)
            finally:
                await nc.close()

    costs, first_page = asyncio.run(scenario())
    assert first_page <= (1 << 20) // 2
    assert costs == {r: e for r, e in runs.items() if e["tenant"] == "acme"}


def test_stopping_the_autoscaler_sends_the_answers_in_hand(nats_server, tmp_path) -> None:
    """A query being answered when the service stops gets its answer before the connection
    closes (not a wait for an answer that never comes)."""
    from tests.buses import NatsHarness

    harness = NatsHarness(nats_server.url)

    async def scenario() -> EventsPage:
        async with harness.service(AutoscalerService, home=tmp_path) as service:
            assert isinstance(service, AutoscalerService) and service.queries is not None
            queries = service.queries
            bus = await harness.client()
            await asyncio.gather(*(bus.js.publish(subjects.TRAINING_PROGRESS.name,
                                                  b"x" * 200, headers=_acme(n))
                                   for n in range(10000)))
            nc = await nats.connect(nats_server.url)
            asked = asyncio.ensure_future(nc.request(
                query_subject(EVENTS, "acme"), EventsRequest(1).encode(), timeout=10))
            for _ in range(500):
                if queries.admission.in_hand("acme"):
                    break
                await asyncio.sleep(0.01)
            assert queries.admission.in_hand("acme")
        try:
            return EventsPage.decode((await asked).data)
        finally:
            await nc.close()

    page = asyncio.run(scenario())
    assert page.events and not page.error
