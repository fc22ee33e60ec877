"""`lmforge tenants create`: a credential of the tenant's own, and the running embedded
nats-server told to reload (the reload itself: tests/libs/test_nats_security.py)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from lmforge.cli.tenants import reload_embedded_server, run_tenants
from lmforge.security.nats_roles import role_permissions
from lmforge.security.nats_secrets import NatsCredential, ensure_nats_secrets

# A stand-in for the nats-server process: says when it gets SIGHUP.
HANGUP_RECORDER = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGHUP, lambda *_: out.write_text("reload"))
out.with_suffix(".ready").write_text("")
time.sleep(60)
"""


def test_create_writes_the_tenants_credential_and_reloads_the_embedded_server(
        tmp_path: Path, capsys) -> None:
    home = tmp_path / "home"
    found = ensure_nats_secrets(home / "secrets")
    marker = tmp_path / "hup"
    recorder = subprocess.Popen([sys.executable, "-c", HANGUP_RECORDER, str(marker)])
    try:
        deadline = time.monotonic() + 30
        while not marker.with_suffix(".ready").exists():
            assert time.monotonic() < deadline and recorder.poll() is None
            time.sleep(0.02)
        state = {"nats": {"security": "tls+credentials", "embedded": True,
                          "pid": recorder.pid}}
        args = argparse.Namespace(action="create", tenant="acme", json=True)
        assert run_tenants(args, home, state) == 0
        deadline = time.monotonic() + 15  # a loaded machine delivers signals late
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        recorder.kill()
        recorder.wait()
    said = json.loads(capsys.readouterr().out)
    assert marker.read_text() == "reload" and "reloaded" in said["server"]
    cred = NatsCredential.load(Path(said["creds"]))
    assert (cred.role, cred.tenant, cred.user) == ("client", "acme", "client-acme")
    config = json.loads(found.server_config.read_text())
    (acme,) = [u for u in config["authorization"]["users"] if u["user"] == "client-acme"]
    assert acme["permissions"] == role_permissions("client", tenant="acme").as_config()
    assert "lmforge.dataset.ready.acme" in acme["permissions"]["publish"]["allow"]
    assert "lmforge.dataset.ready.default" not in acme["permissions"]["publish"]["allow"]
    assert cred.password not in found.server_config.read_text()  # only its hash

    listing = argparse.Namespace(action="list", json=True)
    assert run_tenants(listing, home, state) == 0
    assert {t["tenant"] for t in json.loads(capsys.readouterr().out)} == {"acme", "default"}


def test_a_bad_tenant_name_is_refused(tmp_path: Path) -> None:
    ensure_nats_secrets(tmp_path / "home" / "secrets")
    args = argparse.Namespace(action="create", tenant="a.b", json=False)
    assert run_tenants(args, tmp_path / "home", None) == 2


def test_what_happens_to_a_server_that_cannot_be_reloaded_is_said() -> None:
    assert "next `lmforge up`" in reload_embedded_server(None)
    assert "open" in reload_embedded_server({"nats": {"security": "open"}})
    assert "is a cluster" in reload_embedded_server(
        {"nats": {"security": "tls+credentials", "embedded": True, "pid": None,
                  "nodes": [{"name": "n0"}, {"name": "n1"}, {"name": "n2"}]}})
    assert "not the embedded server" in reload_embedded_server(
        {"nats": {"security": "tls+credentials", "embedded": False}})
