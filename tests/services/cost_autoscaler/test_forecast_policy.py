"""The forecast policy on a synthetic seasonal series: it provisions ahead of the daily
rise that the reactive rule only sees once it has happened, by exactly a replica's cold
start plus one decision (not for the peak of the whole 15-minute lead), and never scales
in on a forecast alone. One MSTL fit (daily season, 3 days of 5-minute buckets, ~0.5 s)
serves the module."""

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
COLD_START_S, ROUND_S = 120.0, 5.0


def office_hours(bucket: int, rng: np.random.Generator) -> float:
    """20 req/s, 200 req/s from 09:00 to 17:00, 5% noise."""
    in_day = bucket % DAY_BUCKETS
    base = BUSY if OPENS <= in_day < 17 * 12 else QUIET
    return float(base * (1 + rng.normal(0, 0.05)))


@pytest.fixture(scope="module")
def forecaster() -> GatewayForecaster:
    """Three days of history up to 08:30 of the fourth, fitted once."""
    rng = np.random.default_rng(3)
    config = ForecastConfig(lead_s=900, quantile=0.9, min_history_days=2, refit_every_s=3600,
                            ready_after_s=COLD_START_S, decide_every_s=ROUND_S)
    f = GatewayForecaster(config)
    last = 3 * DAY_BUCKETS + OPENS - 6  # 08:30 on day 4
    for bucket in range(last + 1):
        f.record(bucket * BUCKET_S, office_hours(bucket, rng), 0.0)
    f.record((last + 1) * BUCKET_S, QUIET, 0.0)  # closes the 08:30 bucket
    assert f.refit_due() and f.refit()
    assert "daily only" in f.model.note
    return f


def opening_s() -> float:
    """09:00 on day 4, in seconds."""
    return float((3 * DAY_BUCKETS + OPENS) * BUCKET_S)


def test_the_forecast_sees_the_morning_rise_before_it_happens(forecaster):
    at_0850 = opening_s() - 600
    forecast = forecaster.forecast(at_0850)
    assert forecast is not None
    assert forecast.peak_requests_per_second >= 0.85 * BUSY
    assert forecast.horizon_s == 900
    # Before the rise the path stays near the quiet level: the rise is a forecast, not a
    # margin on everything.
    fitted_through = 3 * DAY_BUCKETS + OPENS - 6
    at_0840 = forecaster.model.upper(fitted_through + 2, newest_bucket=fitted_through)
    assert at_0840 is not None and at_0840 < 0.5 * BUSY


def predictive_replicas(forecaster: GatewayForecaster, now_s: float) -> int:
    config = PolicyConfig(max_replicas=20, rps_per_replica=20.0)
    load = {GATEWAY: ServiceLoad(GATEWAY, requests_per_second=QUIET)}
    decided = PredictivePolicy(ReactivePolicy(config)).decide(
        load, {GATEWAY: 1}, {}, forecaster.forecast(now_s), now_s=now_s)
    return next(d.replicas for d in decided if d.service == GATEWAY)


def test_replicas_are_provisioned_for_when_they_would_serve_not_for_the_lead_peak(
        forecaster):
    """A decision covers [now + cold start, now + cold start + one round]: the replicas it
    asks for serve from then, and the next round can still ask for later load. The old rule
    (the highest upper quantile over the next 15 minutes) scaled out at 08:45 already."""
    at_0850 = opening_s() - 600
    forecast = forecaster.forecast(at_0850)
    assert forecast is not None
    assert forecast.lead_s == COLD_START_S + ROUND_S
    assert forecast.upper_requests_per_second < 0.5 * BUSY  # 08:52:05 is still quiet
    quiet_fleet = 2  # the quiet level's upper quantile, 20 req/s + noise, on 20 req/s replicas
    assert predictive_replicas(forecaster, at_0850) <= quiet_fleet
    # The last round whose window ends before 09:00 stays quiet; the next one, whose
    # replicas would serve at 09:00, scales out.
    assert predictive_replicas(forecaster, opening_s() - COLD_START_S - ROUND_S - 1
                               ) <= quiet_fleet
    assert predictive_replicas(forecaster, opening_s() - COLD_START_S - ROUND_S) >= 9


def test_predictive_scales_out_ahead_of_the_rise_and_reactive_does_not(forecaster):
    before = opening_s() - COLD_START_S  # its replicas serve from 09:00
    config = PolicyConfig(max_replicas=20, rps_per_replica=20.0)
    load = {GATEWAY: ServiceLoad(GATEWAY, requests_per_second=QUIET)}
    reactive = {d.service: d for d in ReactivePolicy(config).decide(load, {GATEWAY: 1}, {})}
    predictive = {d.service: d for d in PredictivePolicy(ReactivePolicy(config)).decide(
        load, {GATEWAY: 1}, {}, forecaster.forecast(before), now_s=before)}
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
