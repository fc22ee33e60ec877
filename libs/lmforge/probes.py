"""One HTTP port per process: /metrics for Prometheus, /healthz and /readyz for Kubernetes.

Kubernetes asks two questions of a pod, and they must not be the same one:

- `/healthz` (liveness): is this process worth keeping? It answers 503 only when the
  asyncio loop stopped beating for `stale_after_s`: a wedged loop can neither consume
  nor drain, and a restart is the cure. It never depends on NATS: a NATS outage must
  not restart every pod in the namespace at once (they reconnect on their own).
- `/readyz` (readiness): is this process doing its work? 503 until the service
  consumes (`mark_ready`), while any registered check fails (the NATS connection is
  down), and again once SIGTERM starts the drain. A PodDisruptionBudget counts only
  ready pods, so a draining trainer is not counted as available.

The body is one line of text saying why, for `kubectl describe` and for people.
`/metrics` is prometheus_client's own exposition (OpenMetrics when asked for).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger("lmforge.probes")

HEALTHZ = "/healthz"
READYZ = "/readyz"
METRICS = "/metrics"


class Health:
    """What /healthz and /readyz report for this process; thread-safe."""

    def __init__(self, *, stale_after_s: float = 120.0) -> None:
        self.stale_after_s = stale_after_s
        self._lock = threading.Lock()
        self._last_beat: float | None = None
        self._ready = False
        self._not_ready_because = "starting: not consuming yet"
        self._checks: dict[str, Callable[[], bool]] = {}

    def beat(self) -> None:
        """The event loop is alive (called by a task on the loop every few seconds)."""
        with self._lock:
            self._last_beat = time.monotonic()

    def set_ready(self) -> None:
        with self._lock:
            self._ready = True

    def set_not_ready(self, because: str) -> None:
        with self._lock:
            self._ready = False
            self._not_ready_because = because

    def require(self, name: str, check: Callable[[], bool]) -> None:
        """Readiness also needs `check()` to be true (e.g. 'nats': the connection is up)."""
        with self._lock:
            self._checks[name] = check

    def liveness(self) -> tuple[bool, str]:
        with self._lock:
            last = self._last_beat
        if last is None:
            return True, "alive (starting)"
        age = time.monotonic() - last
        if age > self.stale_after_s:
            return False, f"event loop silent for {age:.0f}s (limit {self.stale_after_s:.0f}s)"
        return True, "alive"

    def readiness(self) -> tuple[bool, str]:
        with self._lock:
            ready, because, checks = self._ready, self._not_ready_because, dict(self._checks)
        if not ready:
            return False, because
        failing = []
        for name, check in checks.items():
            try:
                ok = check()
            except Exception as exc:  # a check that cannot answer is a failing check
                log.debug("readiness check %s raised %r", name, exc)
                ok = False
            if not ok:
                failing.append(name)
        if failing:
            return False, "not ready: " + ", ".join(failing) + " down"
        return True, "ready"


HEALTH = Health()
"""The process's health: services mark it; the probe server reads it."""


def _handler(health: Health, registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class ProbeHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == METRICS:
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send(HTTPStatus.OK, encoder(registry), content_type)
            elif path in (HEALTHZ, READYZ):
                ok, why = health.liveness() if path == HEALTHZ else health.readiness()
                status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
                self._send(status, (why + "\n").encode(), "text/plain; charset=utf-8")
            else:
                self._send(HTTPStatus.NOT_FOUND,
                           f"not found; try {METRICS}, {HEALTHZ} or {READYZ}\n".encode(),
                           "text/plain; charset=utf-8")

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # a probe every few seconds is not worth a log line

    return ProbeHandler


def serve_probes(port: int, *, host: str = "0.0.0.0", health: Health = HEALTH,
                 registry: CollectorRegistry = REGISTRY) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz and /readyz on `port` (0: a free one) in a daemon thread.

    `host` defaults to all interfaces, as prometheus_client's own server did, so
    Prometheus and the kubelet reach it from outside the pod.
    """
    server = ThreadingHTTPServer((host, port), _handler(health, registry))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="probes", daemon=True).start()
    return server
