"""How many tenant queries cost-autoscaler works on at once, and how many per tenant.

Each events query opens a consumer on the stream and scans for up to a few seconds
holding up to a page of events; each cost query reads the ledger. Without a limit one
tenant asking in a loop takes the service's memory and time from every other tenant
and from its own control loop. So a tenant has a few queries in hand at most: one
more is answered `busy` at once (its client asks again shortly), and the queries
admitted wait their turn for one of the service's few answering slots, which every
tenant shares. Waiting there are at most `per_tenant` queries of each tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator


class QueryAdmission:
    def __init__(self, *, per_tenant: int, at_once: int) -> None:
        self.per_tenant = per_tenant
        self._in_hand: Counter[str] = Counter()
        self._answering = asyncio.Semaphore(at_once)

    def in_hand(self, tenant: str) -> int:
        """The queries of `tenant` admitted and not yet answered."""
        return self._in_hand[tenant]

    def admit(self, tenant: str) -> bool:
        """Take one query of `tenant` in hand (False: it has `per_tenant` already); every
        admitted query is `answering` once, which gives its place back."""
        if self._in_hand[tenant] >= self.per_tenant:
            return False
        self._in_hand[tenant] += 1
        return True

    @contextlib.asynccontextmanager
    async def answering(self, tenant: str) -> AsyncIterator[None]:
        """Hold one of the shared answering slots for an admitted query of `tenant`."""
        try:
            async with self._answering:
                yield
        finally:
            self._in_hand[tenant] -= 1
            if not self._in_hand[tenant]:
                del self._in_hand[tenant]
