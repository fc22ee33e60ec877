"""The gateway's load history and its scheduled forecast, as one object the control loop
and the replay both drive: record a reading, refit when due, read the forecast."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.cost_autoscaler.forecasting import ForecastConfig, SeasonalForecaster
from services.cost_autoscaler.history import LoadHistory
from services.cost_autoscaler.policy import GatewayForecast


@dataclass
class GatewayForecaster:
    config: ForecastConfig = field(default_factory=ForecastConfig)
    history: LoadHistory = field(default_factory=LoadHistory)
    model: SeasonalForecaster = field(init=False)

    def __post_init__(self) -> None:
        self.model = SeasonalForecaster(self.config)

    def record(self, now_s: float, requests_per_s: float, backlog: float) -> list[int]:
        """One reading; returns the buckets it closed (to persist)."""
        closed = self.history.add(now_s, requests_per_s, backlog)
        for bucket in closed:
            self.model.observe(bucket, self.history.finished[bucket].requests_per_s)
        return closed

    def refit_due(self) -> bool:
        newest = self.history.newest()
        return newest is not None and self.model.due(newest)

    def refit(self) -> bool:
        """Fit on the history kept (seconds of CPU: run it off the event loop)."""
        values, newest, gaps = self.history.series()
        fitted = self.model.fit(values, newest)
        if fitted and gaps:
            self.model.note += f"; {gaps} empty bucket(s) interpolated"
        return fitted

    def forecast(self, now_s: float) -> GatewayForecast | None:
        newest = self.history.newest()
        if newest is None:
            return None
        upper = self.model.window_upper(now_s, newest_bucket=newest)
        if upper is None:
            return None
        return GatewayForecast(upper, self.config.quantile, self.config.lead_s)
