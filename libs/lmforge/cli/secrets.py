"""`lmforge secrets DIR`: the NATS and gateway secrets of a deployment that `lmforge up`
does not run (docker-compose's one-shot `secrets` service).

The same files `lmforge up` makes under `<home>/secrets` (`security.nats_secrets`):
a credential per service, `client`, `admin` and each `--tenant`, the CA, a NATS
server certificate for `--host` names and the nats-server configuration, with its
file paths as the server sees them (`--paths-root`, where the volume is mounted
in the NATS container). `--gateway-host` also issues the gateway a certificate
from the same CA (tls/gateway.pem, tls/gateway-key.pem). Then a directory per
container under `mounts/` with only that container's files
(`security.secret_mounts`): compose mounts each service's own, never the whole
volume. Files already there are kept, so running it again (every `docker
compose up`) changes nothing but the rendered configuration and its copies.

`lmforge nats-init` is the other one-shot: as `admin`, it creates the streams and
buckets that services may use but not make.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.bus import ensure_kv, ensure_streams
from lmforge.cli.runs import connect_nats
from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket
from lmforge.security.nats_connect import NatsAuth
from lmforge.security.nats_secrets import add_tenant_client, ensure_nats_secrets
from lmforge.security.secret_mounts import write_mounts
from lmforge.security.tls_certs import ensure_server_tls


def run_secrets(args: argparse.Namespace) -> int:
    root = Path(args.directory)
    paths_root = Path(args.paths_root) if args.paths_root else None
    found = ensure_nats_secrets(root, hosts=args.host, paths_root=paths_root)
    tenants = []
    for tenant in args.tenant:
        try:
            path, _ = add_tenant_client(found, tenant, paths_root=paths_root)
        except ValueError as exc:
            print(exc)
            return 2
        tenants.append({"tenant": tenant, "creds": str(path)})
    gateway = None
    if args.gateway_host:
        issued = ensure_server_tls(found.tls_dir, args.gateway_host, stem="gateway")
        gateway = {"cert": str(issued.cert), "key": str(issued.key)}
    mounts = write_mounts(found, gateway_tls=gateway is not None)
    print(json.dumps({"secrets": str(found.root), "server_config": str(found.server_config),
                      "ca": str(found.tls.ca), "tenants": tenants, "gateway_tls": gateway,
                      "mounts": {name: str(path) for name, path in mounts.items()}}))
    return 0


def add_secrets_parser(sub: argparse._SubParsersAction, func: object) -> None:
    secrets = sub.add_parser("secrets", help="generate NATS credentials, certificates and the "
                             "nats-server configuration into DIR (docker-compose)")
    secrets.add_argument("directory")
    secrets.add_argument("--host", action="append", required=True,
                         help="a name the NATS server certificate is valid for (repeat)")
    secrets.add_argument("--paths-root", default="",
                         help="where DIR is mounted in the NATS container")
    secrets.add_argument("--tenant", action="append", default=[],
                         help="also a client credential for this tenant (repeat)")
    secrets.add_argument("--gateway-host", action="append", default=[],
                         help="issue the gateway a certificate for this name (repeat)")
    secrets.set_defaults(func=func)


async def create_streams_and_buckets(url: str, auth: NatsAuth, replicas: int) -> list[str]:
    """As `admin`: every stream and key-value bucket, `replicas` copies each. With NATS
    security on, services may use them but not make them; `lmforge up`'s supervisor does
    this before starting them, and compose's one-shot `nats-init` service does it here."""
    nc = await connect_nats(url, auth=auth)
    try:
        js = nc.jetstream()
        await ensure_streams(js, replicas=replicas)
        for bucket in Bucket:
            await ensure_kv(js, bucket, replicas=replicas)
        return [subjects.STREAM, subjects.DEAD_LETTER_STREAM, *(str(b) for b in Bucket)]
    finally:
        await nc.close()
