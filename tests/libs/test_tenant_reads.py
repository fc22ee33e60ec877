"""A tenant reads its own runs, costs and datasets and no other tenant's, enforced by the
nats-server: the CLI as acme shows acme's runs, and acme's credential on a raw
connection is refused the stream, the ledger and globex's query subject."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
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
from lmforge.contracts.tenant_queries import EVENTS, query_subject
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.runtime.nats_server import NatsServer
from lmforge.security.nats_connect import NatsAuth
from lmforge.security.nats_secrets import NatsSecrets, add_tenant_client, ensure_nats_secrets
from services.cost_autoscaler.handlers import AutoscalerService
from tests.helpers import in_process_service

pytestmark = pytest.mark.connected

T0 = 1_700_000_000 * 10**9
RUNS = {"acme": "a1", "globex": "g1"}
"""One run per tenant; acme also forges a run whose header names globex ("forged")."""


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
    stop = threading.Event()
    ready = threading.Event()
    failed: list[BaseException] = []

    async def prepare() -> None:  # what the supervisor does as admin
        nc = await nats.connect(server.url, **_auth(found, "admin").connect_options())
        await ensure_streams(nc.jetstream())
        for bucket in Bucket:
            await ensure_kv(nc.jetstream(), bucket)
        await nc.close()

    async def autoscaler() -> None:
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
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)

    def serve() -> None:
        try:
            asyncio.run(autoscaler())
        except BaseException as exc:  # said by the fixture, not lost in the thread
            failed.append(exc)
            ready.set()

    asyncio.run(prepare())
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert ready.wait(60) and not failed, failed
        yield server, found
    finally:
        stop.set()
        thread.join(60)
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
