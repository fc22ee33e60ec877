"""What `lmforge status --json` prints, as a function: for the command and the status page.

The supervisor's state file says which services run, their replicas, restarts and
metrics ports; the gateway replicas' own /metrics say which models they have
loaded, at what precision, and which loads failed. Both are read fresh each call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.contracts.names import ServiceName

STATUS_KEYS = ("nats_url", "nats", "gateway", "openai_base_url", "services", "home")
"""The parts of the supervisor's state that `status --json` shows (not its pid, nor the
time it was written); `security` (what serves openly: `security_status`) is added."""


def read_status(home: Path, *, metrics_timeout_s: float = 1.0) -> dict[str, Any] | None:
    """`lmforge status --json` of the `lmforge up` of `home`, or None when it is not running.

    Each gateway service entry gains `models`: one entry per replica from its /metrics;
    `security` says what serves openly, from NATS's state and those replicas' gauges."""
    from lmforge.cli.security_status import security_status
    from lmforge.cli.up import read_state

    state = read_state(home)
    if state is None:
        return None
    gateway = (state.get("services") or {}).get(ServiceName.INFERENCE_GATEWAY)
    if gateway and gateway.get("metrics_urls"):
        gateway["models"] = gateway_model_loading(gateway["metrics_urls"],
                                                  timeout_s=metrics_timeout_s)
    return {**{key: state.get(key) for key in STATUS_KEYS},
            "security": security_status(state.get("nats") or {},
                                        (gateway or {}).get("models", []))}


def gateway_model_loading(metrics_urls: list[str], *, timeout_s: float = 1.0
                          ) -> list[dict[str, Any]]:
    """Per gateway replica: models deployed but not loaded there yet, and failed loads,
    read from its /metrics (a replica that does not answer says so, never hides)."""
    from lmforge.cli.metrics import read_samples
    from lmforge.cli.security_status import AUTH_GAUGE, TLS_GAUGE

    pending = "lmforge_gateway_models_pending"
    failures = "lmforge_gateway_model_load_failures_total"
    precision = "lmforge_gateway_model_precision"
    replicas: list[dict[str, Any]] = []
    for index, url in enumerate(metrics_urls):
        try:
            samples = read_samples(url, (pending, failures, precision, AUTH_GAUGE, TLS_GAUGE),
                                   timeout_s=timeout_s)
        except OSError as exc:
            replicas.append({"replica": index, "metrics": f"unreachable: {exc}"})
            continue
        replicas.append({
            "replica": index,
            "models_pending": int(sum(value for _, value in samples[pending])),
            "load_failures": {labels.get("model", ""): int(value)
                              for labels, value in samples[failures] if value},
            "precision": {f"{labels.get('model', '')} {labels.get('version', '')}":
                          labels.get("precision", "") for labels, value in samples[precision]
                          if value},
            # None: the replica does not export the gauge (yet): unknown, not secured
            "auth_required": bool(samples[AUTH_GAUGE][0][1]) if samples[AUTH_GAUGE] else None,
            "tls": bool(samples[TLS_GAUGE][0][1]) if samples[TLS_GAUGE] else None,
        })
    return replicas
