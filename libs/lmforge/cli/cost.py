"""Reading the cost ledger back, for `lmforge cost` and the totals in `lmforge runs`.

The autoscaler writes it (services/cost_autoscaler/ledger.py): one JSON entry
per run id in the `lmforge_cost_ledger` bucket with its charges and totals,
and `_serving` for the gateway's replica-hours and tokens. The CLI only reads.
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


async def read_ledger(nats_url: NatsUrl, *, auth: NatsAuth | None = None, tenant: str = ""
                      ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(ledger entry per run id, the serving entry or {}); with `tenant`, only that
    tenant's runs.

    The filter is here, in the client: the `client` role may read the whole bucket, so
    this keeps a tenant's `lmforge cost` to its own runs but does not stop a tenant's
    credential from reading others' entries with its own NATS client.
    """
    url = nats_url() if callable(nats_url) else nats_url
    nc = await connect_nats(url, auth=auth)
    try:
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
            elif not tenant or data.get("tenant", "") == tenant:
                runs[key] = data
        return runs, serving
    finally:
        await nc.close()
