"""What the autoscaler observes: JetStream consumer backlogs and the gateway's rate."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request

from nats.js import JetStreamContext

from lmforge.contracts import subjects
from lmforge.contracts.names import ServiceName, consumer_owner

_REQUESTS = re.compile(r'^lmforge_gateway_requests_total\{[^}]*\}\s+([0-9.eE+-]+)$', re.M)


async def consumer_backlogs(js: JetStreamContext) -> dict[ServiceName, int]:
    """Pending + unacknowledged events per service, over its durable consumers.

    The owner of a consumer comes from the name catalog; consumers it does not
    know (a test's reader, an operator's `nats consumer add`) are no service's load.
    """
    backlog: dict[ServiceName, int] = {}
    for info in await js.consumers_info(subjects.STREAM):
        service = consumer_owner(info.name or "")
        if service is None:
            continue
        backlog[service] = backlog.get(service, 0) + (info.num_pending or 0) + (
            info.num_ack_pending or 0)
    return backlog


def parse_request_total(metrics_text: str) -> float:
    return sum(float(v) for v in _REQUESTS.findall(metrics_text))


class RequestRate:
    """Requests per second from successive scrapes of the gateway's /metrics."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self._last: tuple[float, float] | None = None

    def _scrape(self) -> float | None:
        total, reached = 0.0, False
        for url in self.urls:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    total += parse_request_total(response.read().decode())
                    reached = True
            except OSError:
                continue
        return total if reached else None

    async def sample(self) -> float:
        total = await asyncio.to_thread(self._scrape)
        now = time.monotonic()
        if total is None:
            return 0.0
        last, self._last = self._last, (now, total)
        if last is None or now <= last[0]:
            return 0.0
        return max(0.0, (total - last[1]) / (now - last[0]))
