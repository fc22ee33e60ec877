"""Whose a run id is: the tenant that first started a run with it.

The client chooses a run id, and every record of a run is keyed by it (the cost
ledger, stage records, checkpoints, the events a tenant may read). Were run ids
shared, tenant acme could start a run under globex's run id and be handed
globex's cost entry and history, or two tenants training the same URL under the
same model name could merge by accident. So the consumer of dataset.ready claims
the run id for the run's tenant (the one NATS vouched for) before any work, with
a create-if-absent in the `lmforge_run_owners` bucket: one atomic write on the
server, so two tenants racing for one id cannot both win. Another tenant's
dataset.ready with a taken id fails once with `run_id_taken` as the reason; the
owner's own runs under it go on as before.

Runs without a tenant (an open deployment) claim their ids too, for the tenant
'': nothing changes for them, and a deployment that turns tenants on later does
not hand its earlier run ids to the first tenant that names one.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # dispatch imports this module
    from lmforge.dispatch import KeyValue


def owner_key(run_id: str) -> str:
    """The bucket key of `run_id`: its sha256, as a run id may hold characters (spaces,
    ':', non-ASCII) that a key-value key may not."""
    return hashlib.sha256(run_id.encode()).hexdigest()


async def claim_run_id(owners: KeyValue, run_id: str, tenant: str) -> str:
    """The tenant `run_id` belongs to: `tenant` when it is the first to use it (or used it
    first before), else the tenant that did."""
    claim = json.dumps({"run_id": run_id, "tenant": tenant}, sort_keys=True).encode()
    stored = await owners.put_if_absent(owner_key(run_id), claim)
    return str(json.loads(stored)["tenant"])


def run_id_taken(run_id: str) -> str:
    """Why a run id another tenant owns cannot start this tenant's run. It does not name
    the owner: which tenants exist, and their run ids, are theirs."""
    return (f"run id {run_id!r} belongs to another tenant's run (a run id is the tenant's "
            f"that first used it); nothing was done. Start this run under another run id: "
            f"`lmforge run --run-id NEW_ID`, or leave --run-id out for one made from your "
            f"tenant, data and model name")
