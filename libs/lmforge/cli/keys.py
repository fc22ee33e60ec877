"""`lmforge keys create|list|revoke`: the gateway's API keys, as `admin` on NATS.

A created key is printed once and never again: only its salted hash is
stored (`lmforge.security.api_keys`). Running gateways take a new or revoked
key up within a second or so; once any key exists they require one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from rich.console import Console
from rich.table import Table

from lmforge.bus import NatsKeyValue
from lmforge.cli.runs import connect_nats
from lmforge.contracts.names import Bucket
from lmforge.security.api_keys import ApiKeyBook, InvalidTenant
from lmforge.security.nats_connect import NatsAuth


async def manage_keys(args: argparse.Namespace, nats_url: str, auth: NatsAuth) -> int:
    nc = await connect_nats(nats_url, auth=auth)
    try:
        book = ApiKeyBook(NatsKeyValue(nc.jetstream(), Bucket.API_KEYS))
        if args.action == "create":
            try:
                key = await book.create(args.tenant, rate_per_s=args.rate, burst=args.burst)
            except InvalidTenant as exc:
                Console(stderr=True).print(f"[red]{exc}[/]")
                return 2
            print(json.dumps({"tenant": args.tenant, "key": key}) if args.json else key)
            if not args.json:
                Console(stderr=True).print("shown once: store it now (only its hash is kept)")
            return 0
        if args.action == "revoke":
            if not await book.revoke(args.key_id):
                Console(stderr=True).print(f"[red]no key with id {args.key_id!r}[/]")
                return 1
            Console(stderr=True).print(f"revoked {args.key_id}")
            return 0
        records = [r for r in (await book.all()).values()
                   if not args.tenant or r.tenant == args.tenant]
        if args.json:
            print(json.dumps([r.public() for r in records]))
            return 0
        table = Table(title="API keys")
        for column in ("key id", "tenant", "created", "rate/s", "burst"):
            table.add_column(column)
        for r in sorted(records, key=lambda r: r.created):
            table.add_row(r.key_id, r.tenant, time.strftime("%Y-%m-%d %H:%M",
                                                            time.localtime(r.created)),
                          f"{r.rate_per_s:g}" if r.rate_per_s else "default",
                          str(r.burst) if r.burst else "default")
        Console().print(table)
        return 0
    finally:
        await nc.close()


def add_keys_parser(sub: argparse._SubParsersAction, func: object) -> None:
    keys = sub.add_parser("keys", help="gateway API keys: create, list, revoke")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="a new key for a tenant (printed once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--rate", type=float, default=0.0, help="requests/s (0: default)")
    create.add_argument("--burst", type=int, default=0, help="requests at once (0: default)")
    listing = actions.add_parser("list", help="key ids and tenants (never the keys)")
    listing.add_argument("--tenant", default="")
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.add_argument("--tenant", default="")
    for parser in (create, listing, revoke):
        parser.add_argument("--json", action="store_true")
        parser.set_defaults(func=func)


def run_keys(args: argparse.Namespace, nats_url: str, auth: NatsAuth) -> int:
    return asyncio.run(manage_keys(args, nats_url, auth))
