"""A run id chosen by one tenant never takes over, or is merged with, another tenant's run,
on a secured nats-server with data-prep and cost-autoscaler on their own credentials and
the CLI on each tenant's.

globex starts run g1; acme starting a run under g1 (by hand, or with the CLI) fails with
the reason, which `lmforge run` shows, and globex's events and cost entry are untouched.
Two tenants running the same data under the same model name get a run each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import nats.js.errors
import pytest

from lmforge.bus import EventBus, ensure_kv, ensure_streams
from lmforge.cli.main import main as lmforge_main
from lmforge.cli.runs import stream_events
from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket, ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.runtime.nats_server import NatsServer
from lmforge.security.nats_connect import NatsAuth
from lmforge.security.nats_secrets import NatsSecrets, add_tenant_client, ensure_nats_secrets
from services.cost_autoscaler.handlers import AutoscalerService
from services.data_prep.handlers import DataPrepService
from tests.conftest import TEST_DATA
from tests.helpers import in_process_service, serving_in_a_thread

pytestmark = pytest.mark.connected

TAKEN = "belongs to another tenant's run"
"""The words of the refusal (`lmforge.run_owners.run_id_taken`)."""


class Secured:
    """The server, its secrets, each tenant's data and the CLI as a tenant."""

    def __init__(self, server: NatsServer, found: NatsSecrets, root: Path) -> None:
        self.server, self.found, self.root = server, found, root

    def auth(self, role: str = "", tenant: str = "") -> NatsAuth:
        path = self.found.client_path(tenant) if tenant else self.found.credential_path(role)
        return NatsAuth.from_files(path, self.found.tls.ca)

    def data(self, tenant: str) -> Path:
        return self.root / "data" / tenant / "corpus.txt"

    def cli(self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
            tenant: str, *argv: str) -> tuple[int, str]:
        """`lmforge ARGV` with `tenant`'s credential: its exit code, stdout + stderr."""
        monkeypatch.setenv("LMFORGE_HOME", str(self.root / f"cli-{tenant}"))
        monkeypatch.setenv("LMFORGE_NATS_URL", self.server.url)
        monkeypatch.setenv("LMFORGE_NATS_CREDS", str(self.found.client_path(tenant)))
        monkeypatch.setenv("LMFORGE_NATS_CA", str(self.found.tls.ca))
        capsys.readouterr()
        code = lmforge_main(list(argv))
        said = capsys.readouterr()
        return code, said.out + said.err

    async def events(self, run_id: str, *, tenant: str = "") -> list[tuple[str, object]]:
        """`run_id`'s events as `tenant` reads them (as admin: every tenant's)."""
        auth = self.auth(tenant=tenant) if tenant else self.auth("admin")
        return [(subject, event) async for subject, event, _t, _c
                in stream_events(self.server.url, run_id=run_id, idle_timeout_s=0.5,
                                 auth=auth)]

    async def ledger(self, run_id: str) -> bytes | None:
        nc = await nats.connect(self.server.url, **self.auth("admin").connect_options())
        try:
            kv = await nc.jetstream().key_value(Bucket.COST_LEDGER)
            try:
                return (await kv.get(run_id)).value
            except nats.js.errors.KeyNotFoundError:
                return None
        finally:
            await nc.close()

    async def wait_prepared(self, run_id: str, timeout_s: float = 120.0) -> str:
        """The tenant of `run_id`'s ledger entry, once its dataset.prepared is charged."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            raw = await self.ledger(run_id)
            if raw is not None:
                return str(json.loads(raw)["tenant"])
            await asyncio.sleep(0.2)
        raise TimeoutError(f"run {run_id} was not prepared within {timeout_s:.0f}s")


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """A secured nats-server with acme's and globex's client credentials; data-prep and
    cost-autoscaler on their own, in a thread (the CLI runs its own event loop)."""
    root = tmp_path_factory.mktemp("run-id-takeover")
    found = ensure_nats_secrets(root / "secrets")
    for tenant in ("acme", "globex"):
        add_tenant_client(found, tenant)
        (root / "data" / tenant).mkdir(parents=True)
        lines = (TEST_DATA / "fortunes-sample.txt").read_text().splitlines()
        (root / "data" / tenant / "corpus.txt").write_text("\n".join(lines[:1500]) + "\n")
    shutil.copy(root / "data" / "acme" / "corpus.txt", root / "data" / "shared.txt")
    server = NatsServer(store_dir=root / "nats", log_file=root / "nats.log",
                        config_file=found.server_config, tls=True).start()
    secured = Secured(server, found, root)
    async def prepare() -> None:  # what the supervisor does as admin
        nc = await nats.connect(server.url, **secured.auth("admin").connect_options())
        await ensure_streams(nc.jetstream())
        for bucket in Bucket:
            await ensure_kv(nc.jetstream(), bucket)
        await nc.close()

    @contextlib.asynccontextmanager
    async def services() -> AsyncIterator[None]:
        def creds(service: ServiceName) -> dict[str, object]:
            return {"nats_creds": found.credential_path(service), "nats_ca": found.tls.ca}

        async with (
            in_process_service(DataPrepService, server.url, home=root / "home-prep",
                               data_roots=[str(root / "data")], dataprep_vocab_size=512,
                               dataprep_semantic=False, **creds(ServiceName.DATA_PREP)),
            in_process_service(AutoscalerService, server.url, home=root / "home-cost",
                               autoscaler_price_per_hour={"cpu": 3600.0},
                               **creds(ServiceName.COST_AUTOSCALER)),
        ):
            yield

    asyncio.run(prepare())
    try:
        with serving_in_a_thread(services):
            yield secured
    finally:
        server.stop()


def test_acme_under_globexs_run_id_fails_with_the_reason_and_globexs_run_is_untouched(
        secured: Secured, monkeypatch, capsys, caplog) -> None:
    code, out = secured.cli(monkeypatch, capsys, "globex", "run", str(secured.data("globex")),
                            "--model-name", "globex-model", "--run-id", "g1", "--json")
    assert code == 0, out
    assert asyncio.run(secured.wait_prepared("g1")) == "globex"
    globex_entry = asyncio.run(secured.ledger("g1"))

    async def publish_by_hand() -> None:
        """As a client of its own (not the CLI) would: acme's credential, its own message
        id, globex's run id."""
        client = EventBus("cli")
        await client.connect(secured.server.url, auth=secured.auth(tenant="acme"),
                             connect_timeout_s=5)
        try:
            await client.publish(ev.DatasetReady(
                run_id="g1", tenant="acme", model_name="acme-model", format="text",
                dataset_uri=str(secured.data("acme"))), msg_id="acme-picked-this-id")
        finally:
            await client.close()

    asyncio.run(publish_by_hand())
    code, out = secured.cli(monkeypatch, capsys, "acme", "run", str(secured.data("acme")),
                            "--model-name", "acme-model", "--run-id", "g1", "--follow",
                            "--timeout", "40")
    assert code == 1, out
    assert "run g1 failed" in out and TAKEN in out and "--run-id" in out
    assert "globex" not in out

    everything = asyncio.run(secured.events("g1"))  # as admin
    assert sum(s == subjects.DATASET_PREPARED.name for s, _ in everything) == 1
    globex_sees = [s for s, _ in asyncio.run(secured.events("g1", tenant="globex"))]
    assert subjects.STAGE_FAILED.name not in globex_sees
    assert subjects.DATASET_PREPARED.name in globex_sees
    assert asyncio.run(secured.ledger("g1")) == globex_entry
    assert "run id 'g1' of tenant 'acme' refused: it belongs to tenant 'globex'" in caplog.text


def test_a_second_tenant_under_a_taken_run_id_is_told_not_silently_dropped(
        secured: Secured, monkeypatch, capsys) -> None:
    """globex picks the run id acme used a moment before: the stream does not take its
    dataset.ready for a repeat of acme's (it used to, and globex waited for nothing)."""
    code, out = secured.cli(monkeypatch, capsys, "acme", "run", str(secured.data("acme")),
                            "--model-name", "m", "--run-id", "nightly", "--json")
    assert code == 0, out
    asyncio.run(secured.wait_prepared("nightly"))
    code, out = secured.cli(monkeypatch, capsys, "globex", "run", str(secured.data("globex")),
                            "--model-name", "m", "--run-id", "nightly", "--follow",
                            "--timeout", "40")
    assert code == 1, out
    assert TAKEN in out


def test_two_tenants_running_the_same_data_under_one_model_name_get_a_run_each(
        secured: Secured, monkeypatch, capsys) -> None:
    shared = str(secured.root / "data" / "shared.txt")
    run_ids = {}
    for tenant in ("acme", "globex"):
        code, out = secured.cli(monkeypatch, capsys, tenant, "run", shared,
                                "--model-name", "shared-model", "--json")
        assert code == 0, out
        run_ids[tenant] = json.loads(out.splitlines()[0])["run_id"]
    assert run_ids["acme"] != run_ids["globex"]
    for tenant, run_id in run_ids.items():
        assert asyncio.run(secured.wait_prepared(run_id)) == tenant
        code, out = secured.cli(monkeypatch, capsys, tenant, "runs", "--json")
        assert run_id in {r["run_id"] for r in json.loads(out.splitlines()[0])}
