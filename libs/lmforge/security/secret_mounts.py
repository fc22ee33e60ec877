"""One directory per container of a deployment, holding only what that container needs.

docker-compose keeps a deployment's secrets in one volume; a container that
mounted all of it could read every other service's NATS credential (and the
CA's key). `lmforge secrets` therefore also lays out, under `mounts/`, a
directory per container, and each container mounts only its own (a volume
`subpath`, read-only):

  mounts/<service>/nats/<service>.json, tls/ca.pem      each service
  mounts/admin/nats/admin.json, tls/ca.pem              the one-shot `nats-init`
  mounts/inference-gateway/tls/gateway{,-key}.pem       and the gateway's TLS, if issued
  mounts/nats-server/nats-server.conf, tls/server{,-key}.pem, tls/ca.pem

Paths inside a mount are those of the secrets directory itself, so the server
configuration's file paths (rendered for `--paths-root`) and every
LMFORGE_NATS_CREDS / _CA path stay what they were. The copies are made again on
every run, and a file that no longer belongs in a mount is removed from it.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.contracts.names import ServiceName
from lmforge.security.nats_roles import ADMIN
from lmforge.security.nats_secrets import NatsSecrets
from lmforge.security.secret_files import secure_dir, write_secret

SERVER_MOUNT = "nats-server"
GATEWAY_TLS = ("tls/gateway.pem", "tls/gateway-key.pem")


def mount_files(found: NatsSecrets, *, gateway_tls: bool) -> dict[str, tuple[str, ...]]:
    """Mount name -> the files (relative to the secrets directory) it holds."""
    ca = str(found.tls.ca.relative_to(found.root))
    mounts: dict[str, tuple[str, ...]] = {}
    for role in (*(str(s) for s in ServiceName), ADMIN):
        mounts[role] = (str(found.credential_path(role).relative_to(found.root)), ca)
    if gateway_tls:
        mounts[str(ServiceName.INFERENCE_GATEWAY)] += GATEWAY_TLS
    tls = found.tls
    mounts[SERVER_MOUNT] = tuple(str(p.relative_to(found.root)) for p in (
        found.server_config, tls.cert, tls.key, tls.ca))
    return mounts


def write_mounts(found: NatsSecrets, *, gateway_tls: bool) -> dict[str, Path]:
    """Copy each container's files into its mount (modes kept: 0600 secrets, 0644 CA);
    remove whatever else a mount holds. Returns mount name -> directory."""
    written: dict[str, Path] = {}
    for name, files in mount_files(found, gateway_tls=gateway_tls).items():
        mount = secure_dir(found.root / "mounts" / name)
        for relative in files:
            source = found.root / relative
            write_secret(mount / relative, source.read_bytes(),
                         mode=source.stat().st_mode & 0o777)
        for stale in [p for p in mount.rglob("*") if p.is_file()]:
            if str(stale.relative_to(mount)) not in files:
                stale.unlink()
        written[name] = mount
    return written
