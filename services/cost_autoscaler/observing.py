"""What the autoscaler observes: JetStream consumer backlogs and the gateway's load."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from prometheus_client.parser import text_string_to_metric_families

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


def parse_gateway_page(metrics_text: str) -> GatewayPage:
    """The counters and gauges of one gateway replica's /metrics page."""
    tokens: dict[str, float] = {}
    backlog = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "lmforge_gateway_generated_tokens_total":
                model = sample.labels.get("model", "")
                tokens[model] = tokens.get(model, 0.0) + float(sample.value)
            elif sample.name in ("lmforge_gateway_queue_depth", "lmforge_gateway_in_flight"):
                backlog += float(sample.value)
    return GatewayPage(parse_request_total(metrics_text), backlog, tokens)


@dataclass(frozen=True, slots=True)
class GatewayPage:
    """What one replica's /metrics said."""

    requests_total: float
    backlog: float
    """Requests generating or waiting (in flight + queue depth)."""
    tokens_total: dict[str, float]
    """Generated tokens per model (a counter since the replica started)."""


@dataclass(frozen=True, slots=True)
class GatewayReading:
    """One round's view of the gateway. `requests_per_second` None = unknown, never 0."""

    requests_per_second: float | None
    backlog: float | None
    tokens: dict[str, float] = field(default_factory=dict)
    """Tokens generated per model since the previous reading (counter resets handled)."""
    unknown_reason: str = ""


class GatewayMetrics:
    """Request rate, backlog and token counts from successive scrapes of every
    gateway replica's /metrics.

    A URL that does not answer is a replica not running (`lmforge up` lists more
    URLs than replicas); when none answers, the load is unknown, not zero: a
    broken scrape must never read as an idle gateway and scale it in. The rate
    needs two scrapes of a replica; a counter that went down is a restarted
    replica, whose new count is all new.
    """

    def __init__(self, urls: list[str], *, timeout_s: float = 2.0) -> None:
        self.urls = urls
        self.timeout_s = timeout_s
        self._last: dict[str, tuple[float, GatewayPage]] = {}

    def _scrape(self) -> tuple[dict[str, GatewayPage], list[str]]:
        pages: dict[str, GatewayPage] = {}
        errors: list[str] = []
        for url in self.urls:
            try:
                with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                    pages[url] = parse_gateway_page(response.read().decode())
            except (OSError, ValueError) as exc:
                errors.append(f"{url}: {exc}")
        return pages, errors

    async def sample(self) -> GatewayReading:
        if not self.urls:
            return GatewayReading(None, None, unknown_reason="no gateway /metrics URL is "
                                  "configured (LMFORGE_AUTOSCALER_GATEWAY_METRICS)")
        pages, errors = await asyncio.to_thread(self._scrape)
        now = time.monotonic()
        if not pages:
            return GatewayReading(None, None, unknown_reason="no gateway /metrics answered: "
                                  + "; ".join(errors))
        rate, baselined = 0.0, False
        tokens: dict[str, float] = {}
        for url, page in pages.items():
            before = self._last.get(url)
            self._last[url] = (now, page)
            if before is None or now <= before[0]:
                continue
            baselined = True
            seconds, old = now - before[0], before[1]
            restarted = page.requests_total < old.requests_total
            rate += (page.requests_total - (0.0 if restarted else old.requests_total)) / seconds
            for model, total in page.tokens_total.items():
                previous = old.tokens_total.get(model, 0.0)
                delta = total if total < previous else total - previous
                tokens[model] = tokens.get(model, 0.0) + delta
        for url in set(self._last) - set(pages):
            del self._last[url]  # gone: its next answer is a new baseline
        backlog = sum(p.backlog for p in pages.values())
        if not baselined:
            return GatewayReading(None, backlog, unknown_reason="first scrape of the gateway: "
                                  "a rate needs two")
        return GatewayReading(rate, backlog, tokens)
