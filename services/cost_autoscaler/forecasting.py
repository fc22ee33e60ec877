"""The gateway's request rate 15 minutes ahead: statsforecast's MSTL, refit on a schedule.

Why MSTL: inference traffic is a daily cycle on a weekly one (weekends are
quieter) plus a slowly moving level; MSTL peels the two seasons off 5-minute
buckets (288 a day, 2016 a week) and hands the rest to AutoETS for the trend.
The weekly season needs more than a week of history (on exactly one week STL
returns a degenerate decomposition: a zero-width interval): with less than
`weekly_after_days` it is left out, and `SeasonalForecaster.note` says so.

Why a schedule and not every tick: one fit on 10 days of buckets took 0.5 s
with the daily season alone and 5.0 s with daily + weekly (statsforecast 2.1.1,
one core of the 2-core development machine; no numba, nothing compiled on the
first fit, import ~1 s). So a fit forecasts the whole path to the next refit
(plus the lead) with its prediction interval, and between fits each finished
bucket moves a level correction: the mean of the path is shifted by an
exponentially weighted average of observed − forecast, so a spike or a ramp
since the fit is followed within a bucket or two instead of waiting hours for
the next fit. The upper quantile is the corrected mean plus the interval's
half-width for the number of buckets ahead being asked about (not for the
distance from the fit, which would overstate the uncertainty late in a path).

Why provision for `ready_after_s + decide_every_s` and not for the peak of the
whole lead: a replica asked for now serves from `now + ready_after_s` (its cold
start), and the next decision, `decide_every_s` later, can still ask for one
that serves from `now + decide_every_s + ready_after_s`. So what this decision
alone must cover is the window between those two instants; anything later is
the business of a later decision, which will see a fresher level correction.
Provisioning for the highest upper quantile of the next 15 minutes instead paid
for up to 15 minutes of a rise before it came (on the replayed 14-day trace:
1.07x the reactive cost, against a 1.05x target; benchmarks/autoscale_replay.py).
The path is still forecast `lead_s` (15 min) ahead, and that peak is reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

BUCKET_S = 300
"""History and forecasts are kept in 5-minute buckets."""
DAY_BUCKETS = 24 * 3600 // BUCKET_S
WEEK_BUCKETS = 7 * DAY_BUCKETS


@dataclass(kw_only=True, slots=True)
class ForecastConfig:
    """How the forecast is fitted and read."""

    lead_s: float = 900.0
    """How far ahead the path is forecast (and its peak reported); must cover
    `ready_after_s + decide_every_s`."""
    ready_after_s: float = 120.0
    """A replica asked for now serves this much later: the gateway's cold start."""
    decide_every_s: float = 5.0
    """Seconds between decisions: the next one can still add replicas for later load."""
    refit_every_s: float = 6 * 3600.0
    """A new fit this often (on the whole history kept, up to `max_history_days`)."""
    quantile: float = 0.8
    """Provision for this quantile of the forecast (0.5 = the mean). 0.8 was chosen on a
    validation split inside the replay trace's training week (benchmarks/autoscale_tune.py)."""
    min_history_days: float = 2.0
    """No forecast before this much history: the reactive rule alone decides."""
    max_history_days: float = 28.0
    """A fit sees at most this much recent history (fit time grows with it)."""
    weekly_after_days: float = 8.0
    """The weekly season joins the fit once this much history is kept (> 7)."""
    correction_weight: float = 0.5
    """Weight of the newest bucket's error in the level correction between fits."""

    def __post_init__(self) -> None:
        if not 0.5 <= self.quantile < 1.0:
            raise ValueError(f"forecast quantile {self.quantile} must be in [0.5, 1)")
        if not 0.0 < self.correction_weight <= 1.0:
            raise ValueError(f"correction weight {self.correction_weight} must be in (0, 1]")
        if self.weekly_after_days <= 7:
            raise ValueError(f"the weekly season needs more than 7 days of history, not "
                             f"{self.weekly_after_days}")
        if self.ready_after_s < 0 or self.decide_every_s <= 0:
            raise ValueError(f"cold start {self.ready_after_s}s must be >= 0 and the decision "
                             f"interval {self.decide_every_s}s > 0")
        if self.lead_s < self.ready_after_s + self.decide_every_s:
            raise ValueError(f"forecast lead {self.lead_s:g}s is shorter than a replica's cold "
                             f"start plus one decision ({self.ready_after_s:g}s + "
                             f"{self.decide_every_s:g}s): raise the lead")
        if self.refit_every_s < BUCKET_S:
            raise ValueError(f"refit interval {self.refit_every_s}s is shorter than one "
                             f"{BUCKET_S}s bucket")

    @property
    def level(self) -> int:
        """statsforecast's two-sided interval whose upper bound is `quantile`."""
        return round(200 * self.quantile - 100)


@dataclass(frozen=True, slots=True)
class FittedPath:
    """One fit: forecast mean and upper-bound half-widths for the buckets after `last_bucket`."""

    last_bucket: int
    mean: np.ndarray
    half_width: np.ndarray
    seasons: tuple[int, ...]


@dataclass
class SeasonalForecaster:
    """Fits MSTL on bucketed history on a schedule; answers upper quantiles in between."""

    config: ForecastConfig = field(default_factory=ForecastConfig)
    path: FittedPath | None = None
    correction: float = 0.0
    note: str = "no fit yet"
    fits: int = 0
    _corrected_through: int = -1

    def due(self, last_bucket: int) -> bool:
        """Whether a fit ending at `last_bucket` (the newest finished bucket) is due."""
        if self.path is None:
            return True
        return (last_bucket - self.path.last_bucket) * BUCKET_S >= self.config.refit_every_s

    def fit(self, values: Sequence[float], last_bucket: int) -> bool:
        """Fit on `values`, the finished buckets up to `last_bucket` (oldest first, gaps
        already filled). Returns False, and says why in `note`, when history is too short."""
        c = self.config
        y = np.asarray(values, dtype=float)[-int(c.max_history_days * DAY_BUCKETS):]
        if len(y) < c.min_history_days * DAY_BUCKETS:
            self.note = (f"no forecast: {len(y) / DAY_BUCKETS:.1f} of "
                         f"{c.min_history_days:g} days of history")
            return False
        from statsforecast.models import MSTL, AutoETS

        weekly = len(y) >= c.weekly_after_days * DAY_BUCKETS
        seasons = (DAY_BUCKETS, WEEK_BUCKETS) if weekly else (DAY_BUCKETS,)
        horizon = math.ceil((c.refit_every_s + c.lead_s) / BUCKET_S) + 1
        model = MSTL(season_length=list(seasons), trend_forecaster=AutoETS(model="ZZN"))
        predicted = model.forecast(y=y, h=horizon, level=[c.level])
        mean = np.asarray(predicted["mean"], dtype=float)
        half_width = np.maximum(np.asarray(predicted[f"hi-{c.level}"], dtype=float) - mean, 0.0)
        self.path = FittedPath(last_bucket, mean, half_width, seasons)
        self.correction, self._corrected_through = 0.0, last_bucket
        self.fits += 1
        kind = "daily + weekly" if weekly else (
            f"daily only (weekly after {c.weekly_after_days:g} days, have "
            f"{len(y) / DAY_BUCKETS:.1f})")
        self.note = f"MSTL {kind}, fitted through bucket {last_bucket}"
        return True

    def observe(self, bucket: int, value: float) -> None:
        """Take in a finished bucket after the fit: it moves the level correction."""
        path = self.path
        if path is None or bucket <= self._corrected_through:
            return
        step = bucket - path.last_bucket
        if 1 <= step <= len(path.mean):
            error = value - float(path.mean[step - 1])
            w = self.config.correction_weight
            self.correction = w * error + (1 - w) * self.correction
        self._corrected_through = bucket

    def upper(self, bucket: int, *, newest_bucket: int) -> float | None:
        """The upper quantile for `bucket`, seen from `newest_bucket` (the last finished);
        None beyond the fitted path."""
        path = self.path
        if path is None:
            return None
        step = bucket - path.last_bucket
        ahead = max(1, bucket - newest_bucket)
        if not 1 <= step <= len(path.mean):
            return None
        width = float(path.half_width[min(ahead, len(path.half_width)) - 1])
        return max(0.0, float(path.mean[step - 1]) + self.correction + width)

    def window_upper(self, start_s: float, end_s: float, *, newest_bucket: int
                     ) -> float | None:
        """The highest upper quantile over the buckets that overlap [start_s, end_s]."""
        first = int(start_s // BUCKET_S)
        last = int(end_s // BUCKET_S)
        values = [self.upper(b, newest_bucket=newest_bucket) for b in range(first, last + 1)]
        known = [v for v in values if v is not None]
        return max(known) if known else None
