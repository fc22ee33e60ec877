"""The autoscaler's Prometheus series: the load it saw and forecast, what it decided, what
that costs per hour, and the dollars it charged to runs.

Recorded from each round's decisions (what the actuator applies), every round,
not only when a decision changed. A forecast of 0 means none was made (the
reactive policy, or too little history) and is not exported; a replica whose
hardware has no price is not given a made-up cost: its $/h series is absent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

from prometheus_client import Counter, Gauge

from services.cost_autoscaler.policy import Decision

LOAD = Gauge("lmforge_autoscaler_load", "Load observed per service (consumer backlog, or "
             "requests/s for the gateway).", ["service"])
FORECAST = Gauge("lmforge_autoscaler_forecast_load",
                 "Load the decision provisioned for, forecast ahead of now.", ["service"])
REPLICAS = Gauge("lmforge_autoscaler_decided_replicas", "Replicas decided per service.",
                 ["service"])
PINNED = Gauge("lmforge_autoscaler_pinned", "1 when an SRE pin decided the service's replicas.",
               ["service"])
COST_PER_HOUR = Gauge("lmforge_autoscaler_cost_usd_per_hour",
                      "Dollars per hour of the decided replicas (their hardware's price).",
                      ["service"])
CHARGED = Counter("lmforge_autoscaler_charged_usd_total",
                  "Dollars charged to run ledgers, by stage.", ["stage"])


def record_scaling(decisions: Iterable[Decision],
                   usd_per_replica_hour: Callable[[str], float | None]) -> None:
    """One round's decisions. A forecast or price this round does not have removes the
    service's series, so an earlier round's value is never shown as this one's."""
    for d in decisions:
        LOAD.labels(d.service).set(d.load)
        if d.forecast_load > 0:
            FORECAST.labels(d.service).set(d.forecast_load)
        else:
            _remove(FORECAST, d.service)
        REPLICAS.labels(d.service).set(d.replicas)
        PINNED.labels(d.service).set(1.0 if d.pinned else 0.0)
        price = usd_per_replica_hour(d.service)
        if price is not None:
            COST_PER_HOUR.labels(d.service).set(d.replicas * price)
        else:
            _remove(COST_PER_HOUR, d.service)


def _remove(gauge: Gauge, service: str) -> None:
    with contextlib.suppress(KeyError):  # never set: nothing to remove
        gauge.remove(service)


def record_charge(stage: str, usd: float) -> None:
    CHARGED.labels(stage).inc(usd)
