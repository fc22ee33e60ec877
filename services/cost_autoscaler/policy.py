"""The reactive scaling policy: replicas from backlog and request rate, pins first.

Pure functions over what was observed, so they can be tested without NATS.
Queue-driven services scale on their JetStream backlog (pending + unacked
events); the gateway scales on requests per second. Scaling down waits for
`scale_down_after` consecutive low readings so a lull does not flap replicas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lmforge.contracts.names import SERVICES, ServiceName


@dataclass(frozen=True, slots=True)
class ServiceLoad:
    service: str
    backlog: int = 0
    """Events pending or unacknowledged on the service's consumers."""
    requests_per_second: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyConfig:
    min_replicas: int = 1
    max_replicas: int = 2
    backlog_per_replica: int = 4
    rps_per_replica: float = 20.0
    scale_down_after: int = 3
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


@dataclass
class ReactivePolicy:
    config: PolicyConfig = field(default_factory=PolicyConfig)
    _low_readings: dict[str, int] = field(default_factory=dict)

    def desired(self, load: ServiceLoad) -> tuple[int, float, str]:
        c = self.config
        if load.service == ServiceName.INFERENCE_GATEWAY:
            want = math.ceil(load.requests_per_second / c.rps_per_replica)
            return want, load.requests_per_second, f"{load.requests_per_second:.1f} req/s"
        want = math.ceil(load.backlog / c.backlog_per(load.service))
        return want, float(load.backlog), f"backlog {load.backlog}"

    def decide(self, loads: dict[str, ServiceLoad], current: dict[str, int],
               pins: dict[str, int]) -> list[Decision]:
        c = self.config
        decisions = []
        for service in SERVICES:
            load = loads.get(service, ServiceLoad(service))
            want, amount, why = self.desired(load)
            if service in pins:
                decisions.append(Decision(service, pins[service], "pinned by SRE", True, amount))
                continue
            want = max(c.min_replicas, min(c.max_replicas, want))
            have = current.get(service, c.min_replicas)
            if want < have:
                self._low_readings[service] = self._low_readings.get(service, 0) + 1
                if self._low_readings[service] < c.scale_down_after:
                    want = have
                    why += f"; holding {have} ({self._low_readings[service]}/"
                    why += f"{c.scale_down_after} low readings)"
            else:
                self._low_readings[service] = 0
            decisions.append(Decision(service, want, why, False, amount))
        return decisions


def training_cost(wall_seconds: float, device: str, prices_per_hour: dict[str, float]) -> float:
    """What a training run cost at the pool's hourly price."""
    return wall_seconds / 3600 * prices_per_hour.get(device, 0.0)
