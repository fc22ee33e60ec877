"""A broken metrics scrape is an unknown load, not zero: the gateway keeps its replicas.

Before: a scrape that failed read as 0 req/s and the reactive rule scaled the
gateway in to its minimum in the middle of its busiest hour.
"""

from __future__ import annotations

import asyncio
import http.server
import threading

from lmforge.runtime.nats_server import free_port
from services.cost_autoscaler.observing import GatewayMetrics
from services.cost_autoscaler.policy import (
    GatewayForecast,
    PolicyConfig,
    PredictivePolicy,
    ReactivePolicy,
    ServiceLoad,
)

GATEWAY = "inference-gateway"


class _Page(http.server.BaseHTTPRequestHandler):
    requests_total = 0.0

    def do_GET(self) -> None:
        type(self).requests_total += 300.0
        body = (f'lmforge_gateway_requests_total{{code="OK",model="m"}} '
                f"{self.requests_total}\n"
                f'lmforge_gateway_generated_tokens_total{{model="m"}} '
                f"{self.requests_total * 32}\n"
                "lmforge_gateway_queue_depth 3.0\nlmforge_gateway_in_flight 5.0\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_failed_scrape_holds_the_gateway_instead_of_scaling_it_in():
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    metrics = GatewayMetrics([f"http://127.0.0.1:{port}/metrics"], timeout_s=1.0)

    async def readings():
        first = await metrics.sample()
        await asyncio.sleep(0.2)
        busy = await metrics.sample()
        server.shutdown()
        server.server_close()
        broken = await metrics.sample()
        return first, busy, broken

    first, busy, broken = asyncio.run(readings())
    assert first.requests_per_second is None and "two" in first.unknown_reason
    assert busy.requests_per_second is not None and busy.requests_per_second > 100
    assert busy.backlog == 8.0 and busy.tokens == {"m": 300.0 * 32}
    assert broken.requests_per_second is None
    assert "no gateway /metrics answered" in broken.unknown_reason

    policy = PredictivePolicy(ReactivePolicy(PolicyConfig(max_replicas=8, scale_down_after=1)))
    load = {GATEWAY: ServiceLoad(GATEWAY, requests_per_second=broken.requests_per_second,
                                 unknown_reason=broken.unknown_reason)}
    # Even a forecast of a quiet hour does not scale in on an unknown load.
    quiet = GatewayForecast(upper_requests_per_second=1.0, quantile=0.9, lead_s=900)
    for _ in range(3):
        (gateway,) = [d for d in policy.decide(load, {GATEWAY: 6}, {}, quiet) if
                      d.service == GATEWAY]
        assert (gateway.replicas, gateway.load_unknown, gateway.policy) == (6, True, "held")
        assert "load unknown" in gateway.reason and "no gateway /metrics answered" in gateway.reason


def test_no_metrics_url_is_unknown_and_says_which_setting():
    reading = asyncio.run(GatewayMetrics([]).sample())
    assert reading.requests_per_second is None
    assert "LMFORGE_AUTOSCALER_GATEWAY_METRICS" in reading.unknown_reason
