"""Per-container secret directories (`lmforge secrets`, docker-compose's mounts)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import bcrypt
import pytest

from lmforge.security.nats_secrets import (
    NatsCredential,
    add_tenant_client,
    ensure_nats_secrets,
)
from lmforge.security.secret_files import write_secret
from lmforge.security.secret_mounts import SERVER_MOUNT, write_mounts

SERVICE_UID = 54321
"""A user that is not root and owns nothing here (compose's services run as 10001)."""


def test_a_mount_holds_its_own_files_and_loses_what_does_not_belong(tmp_path: Path) -> None:
    found = ensure_nats_secrets(tmp_path / "secrets")
    mounts = write_mounts(found, gateway_tls=False)
    stray = mounts["trainer"] / "nats" / "admin.json"
    stray.write_bytes(found.credential_path("admin").read_bytes())
    mounts = write_mounts(found, gateway_tls=False)
    trainer = mounts["trainer"]
    assert sorted(str(p.relative_to(trainer)) for p in trainer.rglob("*") if p.is_file()) \
        == ["nats/trainer.json", "tls/ca.pem"]
    assert stat.S_IMODE((trainer / "nats/trainer.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((trainer / "tls/ca.pem").stat().st_mode) == 0o644
    assert stat.S_IMODE(trainer.stat().st_mode) == 0o700
    server = mounts[SERVER_MOUNT]
    assert (server / "nats-server.conf").read_bytes() == found.server_config.read_bytes()
    assert not (server / "tls" / "ca-key.pem").exists()


def _written(root: Path) -> dict[Path, tuple[int, int]]:
    """Every file under `root` -> (inode, mtime_ns): what a rewrite changes."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file()}


def test_a_second_run_with_nothing_new_rewrites_nothing(tmp_path: Path) -> None:
    """`lmforge secrets` (or `up`) twice: the server configuration is byte for byte what
    it was (each bcrypt hash that still verifies its password is kept, not salted anew)
    and no copy in a mount is written again."""
    found = ensure_nats_secrets(tmp_path / "secrets")
    write_mounts(found, gateway_tls=False)
    config = found.server_config.read_bytes()
    before = _written(found.root)
    again = ensure_nats_secrets(tmp_path / "secrets")
    write_mounts(again, gateway_tls=False)
    assert again.server_config.read_bytes() == config
    assert _written(found.root) == before


def test_a_changed_password_gets_a_new_hash_and_its_copies_follow(tmp_path: Path) -> None:
    found = ensure_nats_secrets(tmp_path / "secrets")
    mounts = write_mounts(found, gateway_tls=False)
    old = json.loads(found.server_config.read_text())["authorization"]["users"]
    cred = NatsCredential.load(found.credential_path("trainer"))
    NatsCredential(cred.user, "a-new-password", cred.role).save(
        found.credential_path("trainer"))
    ensure_nats_secrets(found.root)
    write_mounts(found, gateway_tls=False)
    new = json.loads(found.server_config.read_text())["authorization"]["users"]
    changed = [u["user"] for u, o in zip(new, old, strict=True) if u != o]
    assert changed == ["trainer"]
    trainer = next(u["password"] for u in new if u["user"] == "trainer")
    assert bcrypt.checkpw(b"a-new-password", trainer.encode())
    assert (mounts["trainer"] / "nats/trainer.json").read_bytes() == \
        found.credential_path("trainer").read_bytes()
    assert (mounts[SERVER_MOUNT] / "nats-server.conf").read_bytes() == \
        found.server_config.read_bytes()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")
def test_copies_made_as_root_keep_the_owner_of_their_source(tmp_path: Path) -> None:
    """compose's `secrets` service gives the volume to the services' user (uid 10001 there,
    SERVICE_UID here); `docker compose run --rm secrets "… secrets …"` runs as root with
    no chown after it: the copies, and the mount directories, must stay that user's (root
    -owned 0600 copies made the services unable to read their credential)."""
    found = ensure_nats_secrets(tmp_path / "secrets")
    write_mounts(found, gateway_tls=False)
    for path in [found.root, *found.root.rglob("*")]:
        os.chown(path, SERVICE_UID, SERVICE_UID)
    shutil.rmtree(found.root / "mounts" / "trainer")  # a mount this run makes anew
    left_by_root = found.root / "mounts" / "scheduler" / "nats" / "scheduler.json"
    os.chown(left_by_root, 0, 0)  # what an earlier root run left (same bytes)
    add_tenant_client(found, "acme")  # the configuration changes: rewritten, same owner

    mounts = write_mounts(found, gateway_tls=False)
    trainer = mounts["trainer"]
    for path in (trainer, trainer / "nats", trainer / "tls", trainer / "nats/trainer.json",
                 trainer / "tls/ca.pem", left_by_root, found.server_config,
                 mounts[SERVER_MOUNT] / "nats-server.conf"):
        assert (path.stat().st_uid, path.stat().st_gid) == (SERVICE_UID, SERVICE_UID), path
    # A file root made (the source itself is root's): its copy is root's too.
    os.chown(found.tls.key, 0, 0)
    write_mounts(found, gateway_tls=False)
    assert (mounts[SERVER_MOUNT] / "tls/server-key.pem").stat().st_uid == 0


def test_a_mount_no_container_gets_is_removed(tmp_path: Path) -> None:
    """A service dropped from the deployment (or renamed) leaves no copy of its
    credential behind in a directory nobody keeps up to date."""
    found = ensure_nats_secrets(tmp_path / "secrets")
    write_secret(found.root / "mounts" / "retired-service" / "nats" / "retired.json", b"{}")
    mounts = write_mounts(found, gateway_tls=False)
    assert not (found.root / "mounts" / "retired-service").exists()
    assert sorted(p.name for p in (found.root / "mounts").iterdir()) == sorted(mounts)
