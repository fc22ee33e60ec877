"""Reading the cost ledger back, for `lmforge cost` and the totals in `lmforge runs`.

The autoscaler writes it (services/cost_autoscaler/ledger.py): one JSON entry
per run id in the `lmforge_cost_ledger` bucket with its charges and totals,
and `_serving` for the gateway's replica-hours and tokens. The CLI only reads: the
bucket itself as admin or on an open server, a tenant's own entries as that tenant.
"""

from __future__ import annotations

import json
from typing import Any

import nats.js.errors

from lmforge.bus import ensure_kv
from lmforge.cli.runs import NatsUrl, connect_nats
from lmforge.contracts.names import Bucket
from lmforge.security.nats_connect import NatsAuth

SERVING_KEY = "_serving"
"""The serving entry's key (the ledger's own name for it)."""


async def read_ledger(nats_url: NatsUrl, *, auth: NatsAuth | None = None
                      ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(ledger entry per run id, the serving entry or {}).

    A tenant's client credential gets its own runs' entries only, asked of
    cost-autoscaler (`tenant_reads`): the server refuses it the bucket, which holds
    every tenant's. The admin credential, or none (an open server), reads the bucket.
    """
    url = nats_url() if callable(nats_url) else nats_url
    nc = await connect_nats(url, auth=auth)
    try:
        if auth is not None and auth.reads_by_query:
            from lmforge.cli.tenant_reads import tenant_costs

            return await tenant_costs(nc, auth.tenant)
        kv = await ensure_kv(nc.jetstream(), Bucket.COST_LEDGER)
        runs: dict[str, dict[str, Any]] = {}
        serving: dict[str, Any] = {}
        try:
            keys = list(await kv.keys())
        except nats.js.errors.NoKeysError:
            keys = []
        for key in keys:
            entry = await kv.get(key)
            if entry.value is None:
                continue
            data = json.loads(entry.value)
            if key == SERVING_KEY:
                serving = data
            else:
                runs[key] = data
        return runs, serving
    finally:
        await nc.close()
