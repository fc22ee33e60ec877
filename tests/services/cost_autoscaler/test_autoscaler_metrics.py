"""The autoscaler's /metrics say what each round decided, forecast and costs per hour."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from services.cost_autoscaler.metrics import record_scaling
from services.cost_autoscaler.policy import Decision


def _value(name: str, service: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"service": service})


def test_a_round_sets_replicas_load_forecast_and_dollars_per_hour():
    prices = {"inference-gateway": 0.10, "trainer": None}.get
    record_scaling([
        Decision("inference-gateway", 3, "rps", False, 42.0, forecast_load=55.0,
                 policy="predictive"),
        Decision("trainer", 2, "pinned", True, 1.0, policy="pinned"),
    ], prices)
    assert _value("lmforge_autoscaler_decided_replicas", "inference-gateway") == 3
    assert _value("lmforge_autoscaler_load", "inference-gateway") == 42.0
    assert _value("lmforge_autoscaler_forecast_load", "inference-gateway") == 55.0
    assert _value("lmforge_autoscaler_cost_usd_per_hour",
                  "inference-gateway") == pytest.approx(0.30)
    assert _value("lmforge_autoscaler_pinned", "trainer") == 1
    # No forecast, no price: no series, rather than a made-up 0.
    assert _value("lmforge_autoscaler_forecast_load", "trainer") is None
    assert _value("lmforge_autoscaler_cost_usd_per_hour", "trainer") is None

    record_scaling([Decision("inference-gateway", 1, "idle", False, 2.0)], prices)
    assert _value("lmforge_autoscaler_decided_replicas", "inference-gateway") == 1
    assert _value("lmforge_autoscaler_cost_usd_per_hour", "inference-gateway") == 0.10
