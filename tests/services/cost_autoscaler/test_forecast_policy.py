"""The forecast policy on a synthetic seasonal series: it provisions ahead of the daily
rise that the reactive rule only sees once it has happened, and never scales in on a
forecast alone. One MSTL fit (daily season, 3 days of 5-minute buckets, ~0.5 s) serves
the module."""

from __future__ import annotations

import numpy as np
import pytest

from services.cost_autoscaler.forecasting import BUCKET_S, DAY_BUCKETS, ForecastConfig
from services.cost_autoscaler.gateway_forecast import GatewayForecaster
from services.cost_autoscaler.policy import (
    GatewayForecast,
    PolicyConfig,
    PredictivePolicy,
    ReactivePolicy,
    ServiceLoad,
)

GATEWAY = "inference-gateway"
QUIET, BUSY = 20.0, 200.0
OPENS = 9 * 12  # 09:00 in buckets


def office_hours(bucket: int, rng: np.random.Generator) -> float:
    """20 req/s, 200 req/s from 09:00 to 17:00, 5% noise."""
    in_day = bucket % DAY_BUCKETS
    base = BUSY if OPENS <= in_day < 17 * 12 else QUIET
    return float(base * (1 + rng.normal(0, 0.05)))


@pytest.fixture(scope="module")
def forecaster() -> GatewayForecaster:
    """Three days of history up to 08:30 of the fourth, fitted once."""
    rng = np.random.default_rng(3)
    config = ForecastConfig(lead_s=900, quantile=0.9, min_history_days=2, refit_every_s=3600)
    f = GatewayForecaster(config)
    last = 3 * DAY_BUCKETS + OPENS - 6  # 08:30 on day 4
    for bucket in range(last + 1):
        f.record(bucket * BUCKET_S, office_hours(bucket, rng), 0.0)
    f.record((last + 1) * BUCKET_S, QUIET, 0.0)  # closes the 08:30 bucket
    assert f.refit_due() and f.refit()
    assert "daily only" in f.model.note
    return f


def test_the_forecast_sees_the_morning_rise_before_it_happens(forecaster):
    at_0850 = (3 * DAY_BUCKETS + OPENS) * BUCKET_S - 600
    forecast = forecaster.forecast(at_0850)
    assert forecast is not None
    assert forecast.upper_requests_per_second >= 0.85 * BUSY
    # Before the rise the path stays near the quiet level: the rise is a forecast, not a
    # margin on everything.
    fitted_through = 3 * DAY_BUCKETS + OPENS - 6
    at_0840 = forecaster.model.upper(fitted_through + 2, newest_bucket=fitted_through)
    assert at_0840 is not None and at_0840 < 0.5 * BUSY


def test_predictive_scales_out_ahead_of_the_rise_and_reactive_does_not(forecaster):
    at_0850 = (3 * DAY_BUCKETS + OPENS) * BUCKET_S - 600
    config = PolicyConfig(max_replicas=20, rps_per_replica=20.0)
    load = {GATEWAY: ServiceLoad(GATEWAY, requests_per_second=QUIET)}
    reactive = {d.service: d for d in ReactivePolicy(config).decide(load, {GATEWAY: 1}, {})}
    predictive = {d.service: d for d in PredictivePolicy(ReactivePolicy(config)).decide(
        load, {GATEWAY: 1}, {}, forecaster.forecast(at_0850), now_s=at_0850)}
    assert reactive[GATEWAY].replicas == 1
    assert predictive[GATEWAY].replicas >= 9
    assert predictive[GATEWAY].policy == "predictive"
    assert "forecast" in predictive[GATEWAY].reason
    assert predictive[GATEWAY].forecast_load >= 0.85 * BUSY


def test_a_low_forecast_alone_never_scales_in():
    config = PolicyConfig(max_replicas=20, rps_per_replica=20.0, scale_down_after=1)
    policy = PredictivePolicy(ReactivePolicy(config))
    busy_now = {GATEWAY: ServiceLoad(GATEWAY, requests_per_second=BUSY)}
    quiet_soon = GatewayForecast(upper_requests_per_second=QUIET, quantile=0.9, lead_s=900)
    for _ in range(3):
        got = {d.service: d for d in policy.decide(busy_now, {GATEWAY: 10}, {}, quiet_soon)}
        assert got[GATEWAY].replicas == 10 and got[GATEWAY].policy == "reactive"


def test_pins_win_over_the_forecast():
    policy = PredictivePolicy(ReactivePolicy(PolicyConfig(max_replicas=20)))
    rush = GatewayForecast(upper_requests_per_second=1000.0, quantile=0.9, lead_s=900)
    load = {GATEWAY: ServiceLoad(GATEWAY, requests_per_second=5.0)}
    got = {d.service: d for d in policy.decide(load, {GATEWAY: 1}, {GATEWAY: 2}, rush)}
    assert (got[GATEWAY].replicas, got[GATEWAY].pinned, got[GATEWAY].policy) == (2, True, "pinned")


def test_no_forecast_before_the_minimum_history():
    f = GatewayForecaster(ForecastConfig(min_history_days=2))
    for bucket in range(DAY_BUCKETS + 1):
        f.record(bucket * BUCKET_S, 50.0, 0.0)
    assert not f.refit()
    assert "1.0 of 2 days" in f.model.note
    assert f.forecast(DAY_BUCKETS * BUCKET_S) is None
