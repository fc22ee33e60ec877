"""Per-container secret directories (`lmforge secrets`, docker-compose's mounts)."""

from __future__ import annotations

import stat
from pathlib import Path

from lmforge.security.nats_secrets import ensure_nats_secrets
from lmforge.security.secret_mounts import SERVER_MOUNT, write_mounts


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
