"""Scaling policies: the reactive rule for every service, and the forecast on top of it
for the gateway. Pins first.

Pure functions over what was observed, so they can be tested without NATS and
replayed in simulated time (`replay.py` runs this very code). Queue-driven
services scale on their JetStream backlog (pending + unacked events); the
gateway scales on requests per second against the capacity of one replica
(requests/s at the p99 SLO, measured by benchmarks/gateway_load.py).

Scaling in waits for `scale_down_after` consecutive low readings and for
`scale_in_cooldown_s` since the service's last change, so a lull does not flap
replicas. A load that could not be observed (the gateway's /metrics did not
answer) holds the replicas where they are: unknown is not zero.

The predictive policy provisions the gateway for the upper quantile of the
forecast at the time a replica asked for now would serve (cold start + one
decision interval ahead; the path itself is forecast 15 minutes ahead, see
forecasting.py for why not its peak), never below the reactive rule, and never
scales in on the forecast alone: it only ever adds to what the reactive rule
wants.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from lmforge.contracts.names import SERVICES, ServiceName


@dataclass(frozen=True, slots=True)
class ServiceLoad:
    service: str
    backlog: int = 0
    """Events pending or unacknowledged on the service's consumers."""
    requests_per_second: float | None = 0.0
    """The gateway's rate; None when it could not be observed this round."""
    unknown_reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyConfig:
    min_replicas: int = 1
    max_replicas: int = 2
    backlog_per_replica: int = 4
    rps_per_replica: float = 20.0
    """Requests/s one gateway replica serves within the p99 latency SLO."""
    scale_down_after: int = 3
    """Consecutive low readings before scaling in."""
    scale_in_cooldown_s: float = 0.0
    """No scale-in sooner than this after the service's last change."""
    trainer_jobs_per_replica: int = 1
    """A trainer works on one job for minutes: a second queued run wants a second
    trainer (within max_replicas), not a backlog of four."""

    def backlog_per(self, service: str) -> int:
        if service == ServiceName.TRAINER:
            return self.trainer_jobs_per_replica
        return self.backlog_per_replica


@dataclass(frozen=True, slots=True)
class Decision:
    service: str
    replicas: int
    reason: str
    pinned: bool
    load: float
    load_unknown: bool = False
    forecast_load: float = 0.0
    policy: str = "reactive"
    """"reactive", "predictive", "pinned" or "held" (load unknown)."""


@dataclass
class ReactivePolicy:
    config: PolicyConfig = field(default_factory=PolicyConfig)
    _low_readings: dict[str, int] = field(default_factory=dict)
    _changed_at: dict[str, float] = field(default_factory=dict)

    def desired(self, load: ServiceLoad) -> tuple[int, float, str]:
        c = self.config
        if load.service == ServiceName.INFERENCE_GATEWAY:
            rps = load.requests_per_second or 0.0
            return math.ceil(rps / c.rps_per_replica), rps, f"{rps:.1f} req/s"
        want = math.ceil(load.backlog / c.backlog_per(load.service))
        return want, float(load.backlog), f"backlog {load.backlog}"

    def decide(self, loads: Mapping[str, ServiceLoad], current: Mapping[str, int],
               pins: Mapping[str, int], *, now_s: float = 0.0) -> list[Decision]:
        c = self.config
        decisions = []
        for service in SERVICES:
            load = loads.get(service, ServiceLoad(service))
            have = current.get(service, c.min_replicas)
            if service in pins:
                _, amount, _ = self.desired(load)
                decisions.append(Decision(service, pins[service], "pinned by SRE", True, amount,
                                          load_unknown=load.requests_per_second is None,
                                          policy="pinned"))
                continue
            if load.requests_per_second is None:
                self._low_readings[service] = 0
                decisions.append(Decision(service, have, f"load unknown ({load.unknown_reason}):"
                                          f" holding {have}", False, 0.0, load_unknown=True,
                                          policy="held"))
                continue
            want, amount, why = self.desired(load)
            want = max(c.min_replicas, min(c.max_replicas, want))
            want, why = self._damp_scale_in(service, want, have, why, now_s)
            decisions.append(Decision(service, want, why, False, amount))
        return decisions

    def _damp_scale_in(self, service: str, want: int, have: int, why: str, now_s: float
                       ) -> tuple[int, str]:
        """Scale in only after enough low readings and the cooldown; note each change."""
        c = self.config
        if want < have:
            self._low_readings[service] = self._low_readings.get(service, 0) + 1
            if self._low_readings[service] < c.scale_down_after:
                return have, why + (f"; holding {have} ({self._low_readings[service]}/"
                                    f"{c.scale_down_after} low readings)")
            changed = self._changed_at.get(service)
            if changed is not None and now_s - changed < c.scale_in_cooldown_s:
                return have, why + (f"; holding {have} (cooldown, "
                                    f"{c.scale_in_cooldown_s - (now_s - changed):.0f}s left)")
        else:
            self._low_readings[service] = 0
        if want != have:
            self.note_change(service, now_s)
        return want, why

    def note_change(self, service: str, now_s: float) -> None:
        self._changed_at[service] = now_s
        self._low_readings[service] = 0


@dataclass(frozen=True, slots=True)
class GatewayForecast:
    """The upper quantile of the gateway's request rate `lead_s` ahead (what replicas asked
    for now must serve), and its peak over the whole forecast horizon."""

    upper_requests_per_second: float
    """Provisioned for: the upper quantile over [now + cold start, + one decision]."""
    quantile: float
    lead_s: float
    """How far ahead `upper_requests_per_second` is: cold start + one decision interval."""
    peak_requests_per_second: float = 0.0
    """The highest upper quantile within `horizon_s` (reported, not provisioned for)."""
    horizon_s: float = 0.0


@dataclass
class PredictivePolicy:
    """The reactive rule for every service, raised for the gateway to what the forecast
    says it will need within the lead."""

    reactive: ReactivePolicy = field(default_factory=ReactivePolicy)

    def decide(self, loads: Mapping[str, ServiceLoad], current: Mapping[str, int],
               pins: Mapping[str, int], forecast: GatewayForecast | None, *,
               now_s: float = 0.0) -> list[Decision]:
        decisions = self.reactive.decide(loads, current, pins, now_s=now_s)
        if forecast is None:
            return decisions
        c = self.reactive.config
        gateway = ServiceName.INFERENCE_GATEWAY
        out = []
        for d in decisions:
            if d.service != gateway or d.pinned or d.load_unknown:
                out.append(d)  # pins win; an unknown load holds
                continue
            ahead = min(c.max_replicas, math.ceil(forecast.upper_requests_per_second
                                                  / c.rps_per_replica))
            upper = forecast.upper_requests_per_second
            if ahead > d.replicas:
                if ahead != current.get(gateway, c.min_replicas):
                    self.reactive.note_change(gateway, now_s)
                reason = (f"forecast {upper:.1f} req/s (q{forecast.quantile:g}) in "
                          f"{forecast.lead_s:.0f}s{_peak(forecast)}; now {d.reason}")
                out.append(Decision(gateway, ahead, reason, False, d.load, forecast_load=upper,
                                    policy="predictive"))
            else:
                out.append(Decision(d.service, d.replicas, d.reason + (
                    f"; forecast {upper:.1f} req/s in {forecast.lead_s:.0f}s"
                    f"{_peak(forecast)}"), False, d.load, forecast_load=upper, policy=d.policy))
        return out


def _peak(forecast: GatewayForecast) -> str:
    if not forecast.horizon_s:
        return ""
    return (f", peak {forecast.peak_requests_per_second:.1f} within "
            f"{forecast.horizon_s / 60:.0f} min")
