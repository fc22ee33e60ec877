"""The CLI's reads as a tenant: its events and costs asked of cost-autoscaler.

A tenant's client credential may not read the stream or the ledger bucket
(`security.nats_roles`); `runs.stream_events` and `cost.read_ledger` come here
for it (`NatsAuth.reads_by_query`) and get the same events and entries they would
have read, only the tenant's (`contracts.tenant_queries`), page by page.

cost-autoscaler answers a few queries of one tenant at a time (several `lmforge`
commands and a status page of one tenant may ask together): a `busy` answer is
asked again a few times, shortly after, before it is an error that says so.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import nats.errors
from nats.aio.client import Client

from lmforge.contracts.tenant_queries import (
    BUSY,
    COST,
    EVENTS,
    CostPage,
    CostRequest,
    EventsPage,
    EventsRequest,
    query_subject,
)

QUERY_TIMEOUT_S = 10.0
"""How long one answer may take (a page is at most ~3 s of the responder's scanning)."""
BUSY_RETRIES_S = (0.1, 0.2, 0.4, 0.8, 1.6)
"""The waits before asking again after each `busy` answer (then it is an error), each
0.5-1.5x at random: queries refused together do not come back together."""


class QueryUnanswered(ConnectionError):
    """No answer to a tenant's query: cost-autoscaler is not running, or said why not."""


class _Answer(Protocol):
    error: str


A = TypeVar("A", bound=_Answer)


async def _ask(nc: Client, subject: str, payload: bytes, decode: Callable[[bytes], A]) -> A:
    """The answer on `subject`, asked again after a `busy` one (`BUSY_RETRIES_S`); an
    error answer is a QueryUnanswered saying it."""
    for wait_s in (*BUSY_RETRIES_S, None):
        try:
            reply = await nc.request(subject, payload, timeout=QUERY_TIMEOUT_S)
        except nats.errors.NoRespondersError as exc:
            raise QueryUnanswered(f"nothing answers {subject}: cost-autoscaler answers a "
                                  f"tenant's runs and costs; is it running?") from exc
        except nats.errors.TimeoutError as exc:
            raise QueryUnanswered(f"no answer on {subject} within "
                                  f"{QUERY_TIMEOUT_S:.0f}s") from exc
        answer = decode(reply.data)
        if not answer.error:
            return answer
        if not answer.error.startswith(BUSY) or wait_s is None:
            break
        await asyncio.sleep(wait_s * random.uniform(0.5, 1.5))
    raise QueryUnanswered(f"cost-autoscaler could not answer {subject}: {answer.error}")


async def events_page(nc: Client, tenant: str, *, from_seq: int, run_id: str = ""
                      ) -> EventsPage:
    return await _ask(nc, query_subject(EVENTS, tenant),
                      EventsRequest(from_seq, run_id).encode(), EventsPage.decode)


async def tenant_costs(nc: Client, tenant: str
                       ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(ledger entry per run id of `tenant`, the serving entry or {}), from every page."""
    subject = query_subject(COST, tenant)
    runs: dict[str, dict[str, Any]] = {}
    serving: dict[str, Any] = {}
    after = ""
    while True:
        page = await _ask(nc, subject, CostRequest(after).encode(), CostPage.decode)
        runs.update(page.runs)
        if not after:
            serving = page.serving
        if page.end:
            return runs, serving
        if page.next_after <= after:
            raise QueryUnanswered(f"cost-autoscaler's answers on {subject} do not advance "
                                  f"past run {after!r}: {json.dumps(page.next_after)}")
        after = page.next_after
