"""NATS security: each role can do its work and nothing else (one secured server per module)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import stat
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client

from lmforge.bus import EventBus, StreamSetupError, ensure_kv, ensure_streams
from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket, ServiceName, durable_name
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import Delivery, Subscription
from lmforge.runtime.nats_server import NatsServer
from lmforge.security.nats_connect import NatsAuth
from lmforge.security.nats_roles import inbox_prefix
from lmforge.security.nats_secrets import (
    NatsCredential,
    NatsSecrets,
    add_tenant_client,
    ensure_nats_secrets,
    hash_password,
    is_bcrypt,
)

pytestmark = pytest.mark.connected

ARTIFACT_BUCKETS = (Bucket.STAGE_RECORDS, Bucket.STAGE_CACHE, Bucket.DEPLOYMENTS,
                    Bucket.MODEL_DATASETS, Bucket.API_KEYS)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, NatsSecrets]]:
    root = tmp_path_factory.mktemp("secured")
    found = ensure_nats_secrets(root / "secrets")
    for tenant in ("acme", "globex"):
        add_tenant_client(found, tenant)
    server = NatsServer(store_dir=root / "nats", log_file=root / "nats.log",
                        config_file=found.server_config, tls=True).start()

    async def prepare() -> None:  # what the supervisor does as admin
        nc = await nats.connect(server.url, **auth(found, "admin").connect_options())
        await ensure_streams(nc.jetstream())
        for bucket in Bucket:
            await ensure_kv(nc.jetstream(), bucket)
        await (await nc.jetstream().key_value(Bucket.DEPLOYMENTS)).put("m", b"artifact-ref")
        await nc.close()

    asyncio.run(prepare())
    yield server, found
    server.stop()


def synced(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in its own event loop (the suite has no asyncio plugin)."""
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))
    return run


def auth(found: NatsSecrets, role: str) -> NatsAuth:
    return NatsAuth.from_files(found.credential_path(role), found.tls.ca)


def tenant_auth(found: NatsSecrets, tenant: str) -> NatsAuth:
    return NatsAuth.from_files(found.client_path(tenant), found.tls.ca)


@contextlib.asynccontextmanager
async def connected(server: NatsServer, found: NatsSecrets, role: str
                    ) -> AsyncIterator[tuple[Client, list[str]]]:
    """A raw connection as `role`, with the errors the server sent it."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(server.url, error_cb=on_error, allow_reconnect=False,
                            **auth(found, role).connect_options())
    try:
        yield nc, errors
    finally:
        await nc.close()


def test_secrets_are_private_files(secured: tuple[NatsServer, NatsSecrets]) -> None:
    _, found = secured
    assert stat.S_IMODE(found.root.stat().st_mode) == 0o700
    for path in [found.server_config, found.tls.key, *(found.root / "nats").glob("*.json")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # one credential per service, plus the client and admin roles
    assert {c.role for c in found.credentials()} == {*ServiceName, "client", "admin"}
    assert len({c.password for c in found.credentials()}) == len(found.credentials())


def test_secrets_survive_a_second_up(secured: tuple[NatsServer, NatsSecrets]) -> None:
    _, found = secured
    before = {c.user: c.password for c in found.credentials()}
    ca = found.tls.ca.read_bytes()
    again = ensure_nats_secrets(found.root)
    assert {c.user: c.password for c in again.credentials()} == before
    assert again.tls.ca.read_bytes() == ca


@synced
async def test_an_unauthenticated_connection_is_refused(secured) -> None:
    server, found = secured
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(server.url, tls=auth(found, "client").tls_context(),
                           allow_reconnect=False, connect_timeout=2)


@synced
async def test_a_wrong_password_is_refused(secured) -> None:
    server, found = secured
    options = auth(found, "trainer").connect_options()
    options["password"] = "guessed"
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(server.url, allow_reconnect=False, connect_timeout=2, **options)


def test_the_server_config_holds_no_credential_secret(secured) -> None:
    """Whoever reads nats-server.conf gets bcrypt hashes, not one usable password: not a
    service's, the admin's nor a tenant's."""
    _, found = secured
    text = found.server_config.read_text()
    credentials = [NatsCredential.load(p) for p in (found.root / "nats").glob("*.json")]
    assert {c.user for c in credentials} >= {"admin", "trainer", "client-acme"}
    for cred in credentials:
        assert cred.password not in text, cred
    users = json.loads(text)["authorization"]["users"]
    assert len(users) == len(credentials)
    assert all(is_bcrypt(u["password"]) for u in users)


@synced
async def test_every_credential_is_accepted_against_its_hash(secured) -> None:
    server, found = secured
    for cred in found.credentials():
        nc = await nats.connect(server.url, allow_reconnect=False, connect_timeout=5,
                                **NatsAuth(cred, found.tls.ca).connect_options())
        await nc.close()


@synced
async def test_the_hash_from_the_server_config_is_no_password(secured) -> None:
    server, found = secured
    users = json.loads(found.server_config.read_text())["authorization"]["users"]
    stolen = next(u["password"] for u in users if u["user"] == "admin")
    options = auth(found, "admin").connect_options()
    options["password"] = stolen
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(server.url, allow_reconnect=False, connect_timeout=2, **options)


def test_a_plaintext_config_of_an_older_up_is_migrated_once(tmp_path: Path, caplog) -> None:
    """An older `lmforge up` wrote the passwords themselves; the next `up` rewrites the
    configuration with hashes, keeps every credential file and says so in one line."""
    found = ensure_nats_secrets(tmp_path / "secrets")
    config = json.loads(found.server_config.read_text())
    passwords = {c.user: c.password for c in found.credentials()}
    for user in config["authorization"]["users"]:
        user["password"] = passwords[user["user"]]
    found.server_config.write_text(json.dumps(config))
    files = {p: p.read_bytes() for p in (found.root / "nats").glob("*.json")}
    with caplog.at_level("INFO", logger="lmforge.security.nats_secrets"):
        ensure_nats_secrets(found.root)
        ensure_nats_secrets(found.root)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "plaintext passwords of 9 NATS users" in said[0], said
    assert not any(p in found.server_config.read_text() for p in passwords.values())
    assert {p: p.read_bytes() for p in files} == files


def test_a_password_bcrypt_cannot_hash_is_refused_with_the_reason() -> None:
    too_long = NatsCredential(user="ops", password="x" * 73, role="admin")
    with pytest.raises(ValueError, match="'ops' is 73 bytes: it must be 1-72"):
        hash_password(too_long)


@synced
async def test_plaintext_is_refused(secured) -> None:
    server, found = secured
    options = auth(found, "client").connect_options()
    del options["tls"]
    with pytest.raises((nats.errors.Error, OSError, TimeoutError)):
        await asyncio.wait_for(nats.connect(server.url.replace("tls://", "nats://"),
                                            allow_reconnect=False, connect_timeout=2,
                                            **options), 5)


@synced
async def test_the_client_role_starts_runs_but_cannot_publish_model_exported(secured) -> None:
    server, found = secured
    bus = EventBus("cli")
    await bus.connect(server.url, auth=auth(found, "client"), connect_timeout_s=5)
    try:
        await bus.publish(ev.DatasetReady(run_id="sec-1", dataset_uri="/data/x",
                                          tenant=auth(found, "client").tenant),
                          msg_id="sec-1:dataset.ready")
        with pytest.raises(PermissionError, match=r"lmforge\.model\.exported"):
            await bus.publish(ev.ModelExported(run_id="sec-1"), msg_id="sec-1:exported",
                              retry_for_s=1)
    finally:
        await bus.close()


@synced
async def test_a_tenant_credential_cannot_start_a_run_as_another_tenant(secured) -> None:
    """The server refuses acme's credential on globex's subject; on its own subject, a body
    naming globex is refused by data-prep (the tenant is the subject's); an honest run
    reaches data-prep as acme, whatever tenant header it forged."""
    server, found = secured
    seen: list[tuple[str, str]] = []

    async def prepare(event: ev.DatasetReady, delivery: Delivery) -> None:
        seen.append((event.run_id, delivery.tenant))

    data_prep = EventBus(ServiceName.DATA_PREP)
    acme = EventBus("cli")
    await data_prep.connect(server.url, auth=auth(found, "data-prep"), connect_timeout_s=5)
    await acme.connect(server.url, auth=tenant_auth(found, "acme"), connect_timeout_s=5)
    try:
        with pytest.raises(PermissionError, match=r"lmforge\.dataset\.ready\.globex"):
            await acme.publish(ev.DatasetReady(run_id="as-globex", tenant="globex"),
                               msg_id="as-globex:ready", retry_for_s=1)
        forged = ev.DatasetReady(run_id="forged-body", tenant="globex")
        await acme.js.publish(subjects.DATASET_READY.for_tenant("acme"),
                              forged.SerializeToString(), timeout=5,
                              headers={"Lmforge-Run-Id": "forged-body"})
        await acme.publish(ev.DatasetReady(run_id="honest", tenant="acme"),
                           msg_id="honest:ready", headers={"Lmforge-Tenant": "globex"})
        data_prep.subscribe(Subscription(
            subject=subjects.DATASET_READY, handler=prepare,  # type: ignore[arg-type]
            durable=durable_name(ServiceName.DATA_PREP, subjects.DATASET_READY),
            ack_wait_s=10, max_deliver=2))
        await data_prep.start()
        async with connected(server, found, "admin") as (nc, _):
            sub = await nc.jetstream().subscribe(subjects.STAGE_FAILED.name,
                                                 ordered_consumer=True, stream=subjects.STREAM)
            failed = subjects.STAGE_FAILED.decode((await sub.next_msg(timeout=10)).data)
        for _ in range(100):
            if any(run_id == "honest" for run_id, _ in seen):
                break
            await asyncio.sleep(0.05)
    finally:
        await data_prep.close(grace_s=5)
        await acme.close()
    assert failed.run_id == "forged-body" and "tenant mismatch" in failed.reason
    mine = {"as-globex", "forged-body", "honest"}  # the module's server holds other runs
    assert [(run_id, tenant) for run_id, tenant in seen if run_id in mine] == [
        ("honest", "acme")]


@synced
async def test_a_tenant_created_while_running_counts_after_a_reload(secured) -> None:
    """`lmforge tenants create` on a running server: the credential is refused until the
    server re-reads its configuration (SIGHUP), then may publish its own subject."""
    import signal

    server, found = secured
    path, created = add_tenant_client(found, "initech")
    assert created and path == found.client_path("initech")
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(server.url, allow_reconnect=False, connect_timeout=2,
                           **tenant_auth(found, "initech").connect_options())
    assert server.process is not None
    server.process.send_signal(signal.SIGHUP)
    bus = EventBus("cli")
    await bus.connect(server.url, auth=tenant_auth(found, "initech"), connect_timeout_s=10)
    try:
        await bus.publish(ev.DatasetReady(run_id="initech-1", tenant="initech"),
                          msg_id="initech-1:ready", retry_for_s=5)
    finally:
        await bus.close()


@synced
async def test_the_trainer_cannot_publish_model_deployed(secured) -> None:
    server, found = secured
    bus = EventBus(ServiceName.TRAINER)
    await bus.connect(server.url, auth=auth(found, "trainer"), connect_timeout_s=5)
    try:
        with pytest.raises(PermissionError, match=r"lmforge\.model\.deployed"):
            await bus.publish(ev.ModelDeployed(run_id="sec-2"), msg_id="sec-2:deployed",
                              retry_for_s=1)
    finally:
        await bus.close()


@pytest.mark.parametrize("bucket", ARTIFACT_BUCKETS)
@synced
async def test_a_stolen_client_credential_cannot_read_artifact_buckets(secured, bucket) -> None:
    server, found = secured
    async with connected(server, found, "client") as (nc, errors):
        js = nc.jetstream(timeout=0.5)
        with pytest.raises((nats.errors.TimeoutError, nats.errors.Error)):
            kv = await js.key_value(bucket)
            await kv.get("m")
        with pytest.raises((nats.errors.TimeoutError, nats.errors.Error)):
            await js.get_msg(f"KV_{bucket}", seq=1, direct=True)
        await nc.flush()
    assert any("permissions violation" in e.lower() and f"kv_{bucket}" in e.lower()
               for e in errors), errors


@synced
async def test_a_client_cannot_listen_to_other_users_replies(secured) -> None:
    server, found = secured
    async with connected(server, found, "client") as (nc, errors):
        await nc.subscribe("_INBOX.>")
        await nc.subscribe(f"{inbox_prefix(ServiceName.INFERENCE_GATEWAY)}.>")
        await nc.flush()
        await asyncio.sleep(0.2)
    assert sum("permissions violation for subscription" in e.lower() for e in errors) == 2


@synced
async def test_a_client_cannot_take_a_services_work(secured) -> None:
    server, found = secured
    durable = durable_name(ServiceName.TRAINER, subjects.TRAINING_SCHEDULED)
    async with connected(server, found, "client") as (nc, errors):
        js = nc.jetstream(timeout=0.5)
        with pytest.raises((nats.errors.TimeoutError, nats.errors.Error)):
            psub = await js.pull_subscribe(subjects.TRAINING_SCHEDULED.name, durable=durable,
                                           stream=subjects.STREAM)
            await psub.fetch(1, timeout=1)
        await nc.flush()
    assert any("permissions violation" in e.lower() for e in errors)


@synced
async def test_a_service_does_its_work_within_its_permissions(secured) -> None:
    """The trainer consumes training.scheduled on its durable, records the stage in the KV
    bucket and publishes model.trained: nothing it needs is refused."""
    server, found = secured
    handled = asyncio.Event()

    async def train(event: ev.TrainingScheduled, delivery: Delivery) -> ev.ModelTrained:
        handled.set()
        return ev.ModelTrained(run_id=event.run_id, model_name="m")

    scheduler = EventBus(ServiceName.SCHEDULER)
    trainer = EventBus(ServiceName.TRAINER)
    await scheduler.connect(server.url, auth=auth(found, "scheduler"), connect_timeout_s=5)
    await trainer.connect(server.url, auth=auth(found, "trainer"), connect_timeout_s=5)
    try:
        trainer.subscribe(Subscription(
            subject=subjects.TRAINING_SCHEDULED, handler=train,  # type: ignore[arg-type]
            durable=durable_name(ServiceName.TRAINER, subjects.TRAINING_SCHEDULED),
            ack_wait_s=10, max_deliver=2))
        await trainer.start()
        await scheduler.publish(ev.TrainingScheduled(run_id="sec-3"), msg_id="sec-3:sched")
        await asyncio.wait_for(handled.wait(), 10)
        async with connected(server, found, "admin") as (nc, errors):
            sub = await nc.jetstream().subscribe(subjects.MODEL_TRAINED.name,
                                                 ordered_consumer=True, stream=subjects.STREAM)
            msg = await sub.next_msg(timeout=5)  # (a tenant reads it through cost-autoscaler)
            assert subjects.MODEL_TRAINED.decode(msg.data).run_id == "sec-3"
        assert not errors
        assert not trainer.connection_log.refused_publishes
    finally:
        await trainer.close(grace_s=5)
        await scheduler.close()


def test_the_server_config_never_lets_services_create_streams(secured) -> None:
    _, found = secured
    text = found.server_config.read_text()
    assert "STREAM.CREATE" not in text and "STREAM.DELETE" not in text


@synced
async def test_a_service_that_may_not_make_the_streams_says_to_run_nats_init(secured) -> None:
    """The server drops a forbidden stream update without an answer: the bare request
    timeout used to be all a service said when it started before `nats-init`."""
    server, found = secured
    async with connected(server, found, "scheduler") as (nc, _):
        with pytest.raises(StreamSetupError, match="nats-init"):
            await ensure_streams(nc.jetstream(timeout=1.0), replicas=3)


def test_credentials_never_print_their_password(secured) -> None:
    _, found = secured
    cred = found.credentials()[0]
    assert cred.password not in repr(cred) and cred.password not in str(cred)


def test_settings_refuse_a_missing_credential_file(tmp_path: Path, monkeypatch) -> None:
    from pydantic import ValidationError

    from lmforge.settings import PlatformSettings

    monkeypatch.setenv("LMFORGE_NATS_CREDS", str(tmp_path / "nope.json"))
    with pytest.raises(ValidationError, match="not a readable file"):
        PlatformSettings()


@synced
async def test_keys_are_managed_as_admin_and_stored_only_hashed(secured, capsys) -> None:
    import argparse

    from lmforge.cli.keys import manage_keys

    server, found = secured
    created = argparse.Namespace(action="create", tenant="acme", rate=0.0, burst=0, json=True)
    assert await manage_keys(created, server.url, auth(found, "admin")) == 0
    key = json.loads(capsys.readouterr().out)["key"]
    listing = argparse.Namespace(action="list", tenant="", json=True)
    assert await manage_keys(listing, server.url, auth(found, "admin")) == 0
    listed = capsys.readouterr().out
    assert '"tenant": "acme"' in listed and key.split("_", 2)[2] not in listed
    async with connected(server, found, "admin") as (nc, _):
        stored = [await (await nc.jetstream().key_value(Bucket.API_KEYS)).get(k)
                  for k in await (await nc.jetstream().key_value(Bucket.API_KEYS)).keys()]
    assert all(key.split("_", 2)[2].encode() not in entry.value for entry in stored)
    # a stolen client credential cannot mint keys
    async with connected(server, found, "client") as (nc, errors):
        await nc.publish(f"$KV.{Bucket.API_KEYS}.forged", b"{}")
        await nc.flush()
        await asyncio.sleep(0.2)
    assert any("permissions violation" in e.lower() for e in errors)


@pytest.mark.parametrize("service", list(ServiceName))
def test_every_bucket_a_service_uses_is_in_its_role(service: ServiceName) -> None:
    """A service that starts using a bucket its role lacks would be refused by NATS."""
    import re

    from lmforge.security.nats_roles import BUCKETS

    source = Path(__file__).resolve().parents[2] / "services" / service.replace("-", "_")
    used = {Bucket[name] for file in source.rglob("*.py")
            for name in re.findall(r"Bucket\.([A-Z_]+)", file.read_text())}
    read_write, read_only = BUCKETS[service]
    assert used <= {*read_write, *read_only}
