"""OpenTelemetry tracing and Prometheus metrics, set up once per process.

Tracing follows the standard `OTEL_*` variables: spans are exported over OTLP
gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the exporter reads the
endpoint, headers and timeouts itself). The service name comes from
`OTEL_SERVICE_NAME` or the service. The W3C trace context crosses process
boundaries inside NATS headers (see `inject_context` / `extract_context`),
so one pipeline run is one trace across every service.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import Counter, Histogram

from lmforge.probes import serve_probes

_provider: TracerProvider | None = None
_metrics_port: int | None = None

EVENTS_CONSUMED = Counter(
    "lmforge_events_consumed_total",
    "Events handled, by subject and outcome (ok, failed, dead_lettered, duplicate, retried).",
    ["subject", "outcome"],
)
EVENTS_PUBLISHED = Counter(
    "lmforge_events_published_total", "Events published, by subject.", ["subject"]
)
HANDLER_SECONDS = Histogram(
    "lmforge_handler_seconds",
    "Time spent handling one event, by subject.",
    ["subject"],
    buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2, 10, 60, 300, 1800),
)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, with the current trace id when there is one."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(time.time(), 3),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
        for key in ("run_id", "subject", "stage"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_telemetry(service: str, *, metrics_port: int | None = None, log_level: str = "INFO"
                    ) -> int | None:
    """Configure logging, tracing and (if a port is given) /metrics, /healthz and /readyz.

    Returns the metrics port actually bound (useful when 0 asked for a free one).
    Safe to call twice: the second call is a no-op.
    """
    global _provider, _metrics_port
    if _provider is not None:
        return _metrics_port
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(log_level)
    for noisy in ("nats", "onnx_ir", "onnxscript", "torch.onnx", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)})
    _provider = TracerProvider(resource=resource)
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(_provider)

    if metrics_port is not None:
        server = serve_probes(metrics_port)
        _metrics_port = server.server_address[1]
    return _metrics_port


def shutdown_telemetry() -> None:
    """Flush pending spans; call on the way out."""
    if _provider is not None:
        _provider.shutdown()


def tracer(name: str = "lmforge") -> trace.Tracer:
    return trace.get_tracer(name)


def inject_context(headers: dict[str, str]) -> dict[str, str]:
    """Write the current trace context (W3C traceparent) into message headers."""
    propagate.inject(headers)
    return headers


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    return propagate.extract(dict(headers or {}))
