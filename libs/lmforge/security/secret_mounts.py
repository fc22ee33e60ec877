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
LMFORGE_NATS_CREDS / _CA path stay what they were. Each copy (and directory)
has the mode and owner of its source: run as root (`docker compose run --rm
secrets …`), the copies of files the services' user owns stay that user's, and
readable by it. A copy is rewritten only when its source changed, a file that no
longer belongs in a mount is removed from it, and a mount no container gets any
more is removed.
"""

from __future__ import annotations

import logging
import shutil
import stat
from pathlib import Path

from lmforge.contracts.names import ServiceName
from lmforge.security.nats_roles import ADMIN
from lmforge.security.nats_secrets import NatsSecrets
from lmforge.security.secret_files import owner_of, secure_dir, take_owner, update_secret

SERVER_MOUNT = "nats-server"
GATEWAY_TLS = ("tls/gateway.pem", "tls/gateway-key.pem")

log = logging.getLogger("lmforge.security.secret_mounts")


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
    """Copy each container's files into its mount, each with the mode and owner of its
    source (0600 secrets, 0644 CA; a directory that of its source directory), writing only
    what changed; remove whatever else a mount holds, and the mounts no longer made.
    Returns mount name -> directory."""
    mounts_dir = secure_dir(found.root / "mounts")
    written: dict[str, Path] = {}
    wanted = mount_files(found, gateway_tls=gateway_tls)
    for name, files in wanted.items():
        mount = _mirror_dir(found.root, mounts_dir / name)
        for relative in files:
            source = found.root / relative
            _mirror_dir(source.parent, (mount / relative).parent)
            update_secret(mount / relative, source.read_bytes(),
                          mode=stat.S_IMODE(source.stat().st_mode), owner=owner_of(source))
        for stale in [p for p in mount.rglob("*") if p.is_file()]:
            if str(stale.relative_to(mount)) not in files:
                stale.unlink()
        for empty in sorted((p for p in mount.rglob("*") if p.is_dir()), reverse=True):
            if not any(empty.iterdir()):
                empty.rmdir()
        written[name] = mount
    for gone in [p for p in mounts_dir.iterdir() if p.name not in wanted]:
        log.info("removing %s: no container mounts it any more", gone)
        if gone.is_dir() and not gone.is_symlink():
            shutil.rmtree(gone)
        else:
            gone.unlink()
    return written


def _mirror_dir(source: Path, target: Path) -> Path:
    """`target`, a directory (0700) owned as `source` is: the services' user must be able
    to enter its own mount when `lmforge secrets` ran as root."""
    secure_dir(target)
    take_owner(target, owner_of(source))
    return target
