"""Known /metrics ports for every replica `lmforge up` runs, and a Prometheus target file.

Before this, only the gateway had a port the supervisor knew (its base + replica
index, which the autoscaler reads); every other service bound a random port that
nobody could find, so nothing scraped it. Now each replica gets a port when it
is first started and keeps it across restarts (a restarted trainer is the same
Prometheus target, so `rate()` and alert rules see one series, not a new one),
`lmforge status --json` lists the URLs, and the supervisor writes them as a
Prometheus file-based service discovery document (`<home>/run/prometheus-targets.json`)
that any Prometheus can point `file_sd_configs` at: replicas scaled up or down
appear and disappear on the next refresh.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.contracts.names import ServiceName
from lmforge.runtime.nats_server import free_port


def targets_file(home: Path) -> Path:
    return home.resolve() / "run" / "prometheus-targets.json"


@dataclass
class MetricsPorts:
    """The metrics port of each (service, replica index), fixed at first use.

    `bases` keeps a service on `base + index` (the gateway's, which the autoscaler's
    LMFORGE_AUTOSCALER_GATEWAY_METRICS is built from); every other replica gets a free
    port the first time it starts, remembered for its restarts.
    """

    bases: dict[ServiceName, int] = field(default_factory=dict)
    _assigned: dict[tuple[ServiceName, int], int] = field(default_factory=dict)

    def port(self, service: ServiceName, index: int) -> int:
        key = (service, index)
        if key not in self._assigned:
            base = self.bases.get(service)
            self._assigned[key] = base + index if base else free_port()
        return self._assigned[key]

    def known(self, service: ServiceName, index: int) -> int | None:
        """The port of a replica that has been started, else None."""
        return self._assigned.get((service, index))


def metrics_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/metrics"


def file_sd_document(replicas: list[tuple[ServiceName, int, int]]) -> list[dict[str, object]]:
    """Prometheus file_sd: one target group per replica, labelled service and replica."""
    return [{"targets": [f"127.0.0.1:{port}"],
             "labels": {"service": str(service), "replica": str(index)}}
            for service, index, port in replicas]


def write_targets(path: Path, replicas: list[tuple[ServiceName, int, int]]) -> None:
    """Replace the target file atomically (Prometheus may read it at any moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(file_sd_document(replicas), indent=1))
    tmp.replace(path)
