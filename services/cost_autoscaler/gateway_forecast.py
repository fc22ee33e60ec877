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
        """What to provision for now: the upper quantile over the window a replica asked
        for now is the only one that can cover (from its cold start to the next decision's
        replicas coming up), with the peak over the whole lead alongside, for the record."""
        newest = self.history.newest()
        if newest is None:
            return None
        c = self.config
        ready = now_s + c.ready_after_s
        upper = self.model.window_upper(ready, ready + c.decide_every_s, newest_bucket=newest)
        peak = self.model.window_upper(now_s, now_s + c.lead_s, newest_bucket=newest)
        if upper is None or peak is None:
            return None
        return GatewayForecast(upper, c.quantile, c.ready_after_s + c.decide_every_s,
                               peak_requests_per_second=peak, horizon_s=c.lead_s)
