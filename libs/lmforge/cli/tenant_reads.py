"""The CLI's reads as a tenant: its events and costs asked of cost-autoscaler.

A tenant's client credential may not read the stream or the ledger bucket
(`security.nats_roles`); `runs.stream_events` and `cost.read_ledger` come here
for it (`NatsAuth.reads_by_query`) and get the same events and entries they would
have read, only the tenant's (`contracts.tenant_queries`).
"""

from __future__ import annotations

import json
from typing import Any

import nats.errors
from nats.aio.client import Client

from lmforge.contracts.tenant_queries import (
    COST,
    EVENTS,
    EventsPage,
    EventsRequest,
    query_subject,
)

QUERY_TIMEOUT_S = 10.0
"""How long one answer may take (a page is at most ~2 s of the responder's scanning)."""


class QueryUnanswered(ConnectionError):
    """No answer to a tenant's query: cost-autoscaler is not running, or said why not."""


async def _ask(nc: Client, subject: str, payload: bytes) -> bytes:
    try:
        reply = await nc.request(subject, payload, timeout=QUERY_TIMEOUT_S)
    except nats.errors.NoRespondersError as exc:
        raise QueryUnanswered(f"nothing answers {subject}: cost-autoscaler answers a "
                              f"tenant's runs and costs; is it running?") from exc
    except nats.errors.TimeoutError as exc:
        raise QueryUnanswered(f"no answer on {subject} within "
                              f"{QUERY_TIMEOUT_S:.0f}s") from exc
    return reply.data


async def events_page(nc: Client, tenant: str, *, from_seq: int, run_id: str = ""
                      ) -> EventsPage:
    subject = query_subject(EVENTS, tenant)
    page = EventsPage.decode(await _ask(nc, subject,
                                        EventsRequest(from_seq, run_id).encode()))
    if page.error:
        raise QueryUnanswered(f"cost-autoscaler could not answer {subject}: {page.error}")
    return page


async def tenant_costs(nc: Client, tenant: str
                       ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(ledger entry per run id of `tenant`, the serving entry or {})."""
    subject = query_subject(COST, tenant)
    answer = json.loads(await _ask(nc, subject, b""))
    if answer.get("error"):
        raise QueryUnanswered(f"cost-autoscaler could not answer {subject}: "
                              f"{answer['error']}")
    return dict(answer.get("runs") or {}), dict(answer.get("serving") or {})
