"""`lmforge tenants create|list`: a NATS client credential per tenant.

A tenant's credential may publish `lmforge.dataset.ready.<tenant>` and no other
tenant's subject (`lmforge.security.nats_roles`), so whoever holds it starts runs
as that tenant and as no other: the nats-server refuses the rest, and data-prep
takes the tenant from the subject. `create` writes the credential under
`<home>/secrets/nats/` (0600), renders the server configuration again and, when
`lmforge up` runs the embedded server, has it reload (SIGHUP, no restart, no
dropped connection). Hand the file to the tenant; they run
`LMFORGE_NATS_CREDS=<file> lmforge run ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lmforge.security.nats_secrets import NatsSecrets, add_tenant_client

console = Console(stderr=True)


def reload_embedded_server(state: dict[str, Any] | None) -> str:
    """Have the running embedded nats-server re-read its configuration; say what happened."""
    nats_state = (state or {}).get("nats") or {}
    pid = nats_state.get("pid")
    if not state:
        return "lmforge is not running: the credential counts from the next `lmforge up`"
    if nats_state.get("security") != "tls+credentials":
        return "NATS runs open (--open-nats): credentials are not checked at all"
    if nats_state.get("nodes"):
        # Each node's name is on its command line, not in the shared configuration, and
        # nats-server refuses a reload that would change it (runtime.nats_server).
        return ("NATS is a cluster (--nats-cluster): the credential counts once `lmforge "
                "down` and `lmforge up` restart its nodes")
    if not nats_state.get("embedded") or not pid:
        return ("NATS is not the embedded server: give its operator the new "
                "nats-server.conf and reload it")
    os.kill(int(pid), signal.SIGHUP)  # nats-server: SIGHUP = reload the configuration
    return f"the embedded nats-server (pid {pid}) reloaded its configuration"


def run_tenants(args: argparse.Namespace, home: Path, state: dict[str, Any] | None) -> int:
    found = NatsSecrets(home / "secrets")
    if not found.server_config.exists():
        console.print(f"[red]no NATS secrets under {found.root}[/]: run `lmforge up` once "
                      f"(without --open-nats) to generate them")
        return 1
    if args.action == "create":
        try:
            path, created = add_tenant_client(found, args.tenant)
        except ValueError as exc:
            console.print(f"[red]{exc}[/]")
            return 2
        note = reload_embedded_server(state)
        if args.json:
            print(json.dumps({"tenant": args.tenant, "creds": str(path), "created": created,
                              "server": note}))
        else:
            console.print(f"tenant [bold]{args.tenant}[/]: {'created' if created else 'kept'} "
                          f"{path}; {note}")
            console.print(f"start its runs with LMFORGE_NATS_CREDS={path} lmforge run ...")
        return 0
    tenants = [{"tenant": t, "creds": str(found.client_path(t))} for t in found.tenants()]
    if args.json:
        print(json.dumps(tenants))
    else:
        table = Table(title="tenants with a NATS client credential")
        table.add_column("tenant")
        table.add_column("credential")
        for row in tenants:
            table.add_row(row["tenant"], row["creds"])
        Console().print(table)
    return 0


def add_tenants_parser(sub: argparse._SubParsersAction, func: object) -> None:
    tenants = sub.add_parser("tenants", help="NATS client credentials per tenant")
    actions = tenants.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="a client credential that may start runs as "
                                "TENANT and as no other")
    create.add_argument("tenant")
    listing = actions.add_parser("list", help="tenants and their credential files")
    for parser in (create, listing):
        parser.add_argument("--json", action="store_true")
        parser.set_defaults(func=func)
