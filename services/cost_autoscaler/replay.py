"""Replaying a request-rate trace through the scaling policies, in simulated time.

    python -m services.cost_autoscaler.replay TRACE.csv [--slo-p99-ms 500]
        [--policies static,reactive,predictive] [--train-days 0] [--json]

(`lmforge scaling replay` runs this module.) The trace is a CSV with columns
`minute,requests_per_s`, one row a minute from minute 0. Minute 0 is taken as
the start of a week's Monday (the weekly season's phase only matters to the
forecast, which learns it).

Each simulated minute the policy sees the rate of the minute before (what the
gateway's counters would say), and decides with the very code the control
loop runs (`policy.py`, `gateway_forecast.py`), with the settings it runs with
(LMFORGE_AUTOSCALER_*). A replica asked for becomes ready `cold_start_s`
later and is paid for from the moment it is asked for; a replica let go is
gone at once (those still starting first). A minute whose demand exceeds the
capacity of the ready replicas is an SLO-violation minute. The first
`--train-days` are history only: the predictive policy's forecast is fitted on
them, and scoring (cost, violations, events) starts after them, with every
policy starting at the replicas the reactive rule wants then, all ready.

`static` holds the replicas the peak of the scored minutes needs, all the time.
The control loop decides every few seconds; the replay once a minute (the
trace's resolution), so `scale_down_after` readings are minutes here.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from lmforge.contracts.names import ServiceName
from services.cost_autoscaler.forecasting import ForecastConfig
from services.cost_autoscaler.gateway_forecast import GatewayForecaster
from services.cost_autoscaler.policy import (
    PolicyConfig,
    PredictivePolicy,
    ReactivePolicy,
    ServiceLoad,
)

POLICIES = ("static", "reactive", "predictive")
GATEWAY = ServiceName.INFERENCE_GATEWAY
TICK_S = 60.0
"""The replay decides once a simulated minute (the trace's resolution)."""
MONDAY_OFFSET_S = 4 * 86400
"""Unix time 0 was a Thursday: minute 0 of a trace is placed on the Monday after."""


class TraceError(ValueError):
    """The trace file is not `minute,requests_per_s`, one row a minute from 0."""


def read_trace(path: Path) -> list[float]:
    """Requests/s per minute, checked: header, consecutive minutes from 0, rates >= 0."""
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc}") from exc
    if not rows or set(rows[0]) != {"minute", "requests_per_s"}:
        found = sorted(rows[0]) if rows else "no rows"
        raise TraceError(f"trace {path} needs the columns minute,requests_per_s "
                         f"(found {found})")
    rates = []
    for index, row in enumerate(rows):
        try:
            minute, rate = int(row["minute"]), float(row["requests_per_s"])
        except (TypeError, ValueError) as exc:
            raise TraceError(f"trace {path} line {index + 2}: {exc}") from exc
        if minute != index:
            raise TraceError(f"trace {path} line {index + 2}: minute {minute}, expected "
                             f"{index} (one row a minute, no gaps)")
        if not math.isfinite(rate) or rate < 0:
            raise TraceError(f"trace {path} line {index + 2}: rate {rate} is not >= 0")
        rates.append(rate)
    return rates


@dataclass(kw_only=True, slots=True)
class ReplayConfig:
    policy: PolicyConfig
    forecast: ForecastConfig = field(default_factory=ForecastConfig)
    price_per_replica_hour: float
    cold_start_s: float = 120.0
    train_minutes: int = 0


@dataclass(slots=True)
class PolicyResult:
    policy: str
    replica_hours: float = 0.0
    cost_usd: float = 0.0
    slo_violation_minutes: int = 0
    scale_events: int = 0
    peak_replicas: int = 0
    mean_replicas: float = 0.0
    scored_minutes: int = 0
    forecast_fits: int = 0
    forecast_note: str = ""
    replay_seconds: float = 0.0


@dataclass
class _Fleet:
    """Replicas by the simulated second they become ready."""

    ready_at: list[float] = field(default_factory=list)

    def resize(self, replicas: int, now_s: float, cold_start_s: float) -> None:
        while len(self.ready_at) < replicas:
            self.ready_at.append(now_s + cold_start_s)
        if len(self.ready_at) > replicas:
            self.ready_at.sort()  # those still starting go first
            del self.ready_at[replicas:]

    def ready(self, now_s: float) -> int:
        return sum(1 for t in self.ready_at if t <= now_s)


def replay(rates: list[float], policy: str, config: ReplayConfig) -> PolicyResult:
    """Run one policy over the trace; score the minutes after `train_minutes`."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    started = time.perf_counter()
    c = config.policy
    capacity = c.rps_per_replica
    result = PolicyResult(policy)
    first = min(config.train_minutes, len(rates))
    scored = rates[first:]
    if not scored:
        raise TraceError(f"nothing to score: the trace has {len(rates)} minutes and "
                         f"{config.train_minutes} are training")
    reactive = ReactivePolicy(c)
    predictive = PredictivePolicy(reactive)
    # The replay decides once a simulated minute and its replicas take `cold_start_s`:
    # the forecast is read for that, whatever the control loop's own round is.
    forecast_config = replace(config.forecast, ready_after_s=config.cold_start_s,
                              decide_every_s=TICK_S)
    forecaster = GatewayForecaster(forecast_config) if policy == "predictive" else None
    if forecaster is not None:
        for minute in range(first):
            forecaster.record(MONDAY_OFFSET_S + minute * 60.0, rates[minute], 0.0)

    def clamp(n: int) -> int:
        return max(c.min_replicas, min(c.max_replicas, n))

    static = clamp(math.ceil(max(scored) / capacity))
    start_rate = rates[first - 1] if first else rates[0]
    replicas = static if policy == "static" else clamp(math.ceil(start_rate / capacity))
    fleet = _Fleet()
    fleet.resize(replicas, -math.inf, 0.0)
    total_replica_minutes = 0
    for minute in range(first, len(rates)):
        now_s = MONDAY_OFFSET_S + minute * TICK_S
        if policy != "static":
            observed = rates[minute - 1] if minute else rates[0]
            load: dict[str, ServiceLoad] = {
                GATEWAY: ServiceLoad(GATEWAY, requests_per_second=observed)}
            if forecaster is not None:
                forecaster.record(now_s - 60.0, observed, 0.0)
                if forecaster.refit_due():
                    forecaster.refit()
                decisions = predictive.decide(load, {str(GATEWAY): replicas}, {},
                                              forecaster.forecast(now_s), now_s=now_s)
            else:
                decisions = reactive.decide(load, {str(GATEWAY): replicas}, {}, now_s=now_s)
            wanted = next(d.replicas for d in decisions if d.service == GATEWAY)
            if wanted != replicas:
                result.scale_events += 1
                replicas = wanted
                fleet.resize(replicas, now_s, config.cold_start_s)
        if rates[minute] > fleet.ready(now_s) * capacity + 1e-9:
            result.slo_violation_minutes += 1
        total_replica_minutes += replicas
        result.peak_replicas = max(result.peak_replicas, replicas)
    result.scored_minutes = len(scored)
    result.replica_hours = round(total_replica_minutes / 60, 3)
    result.cost_usd = round(result.replica_hours * config.price_per_replica_hour, 4)
    result.mean_replicas = round(total_replica_minutes / len(scored), 3)
    if forecaster is not None:
        result.forecast_fits = forecaster.model.fits
        result.forecast_note = forecaster.model.note
    result.replay_seconds = round(time.perf_counter() - started, 2)
    return result


def compare(results: dict[str, PolicyResult]) -> dict[str, float]:
    """The predictive policy against the others: the issue's targets as ratios."""
    out: dict[str, float] = {}
    p, r, s = results.get("predictive"), results.get("reactive"), results.get("static")
    if p and r:
        out["violation_reduction_vs_reactive"] = round(
            1 - p.slo_violation_minutes / r.slo_violation_minutes, 4
        ) if r.slo_violation_minutes else 0.0
        out["cost_ratio_vs_reactive"] = round(p.cost_usd / r.cost_usd, 4) if r.cost_usd else 0.0
    if p and s:
        out["cost_saving_vs_static"] = round(1 - p.cost_usd / s.cost_usd, 4) if s.cost_usd else 0.0
    return out


def run_replay(rates: list[float], policies: list[str], config: ReplayConfig
               ) -> dict[str, object]:
    results = {name: replay(rates, name, config) for name in policies}
    return {
        "minutes": len(rates), "train_minutes": config.train_minutes,
        "rps_per_replica": config.policy.rps_per_replica,
        "cold_start_s": config.cold_start_s,
        "price_per_replica_hour": config.price_per_replica_hour,
        "forecast": {"lead_s": config.forecast.lead_s, "quantile": config.forecast.quantile,
                     "refit_every_s": config.forecast.refit_every_s,
                     "provisioned_ahead_s": config.cold_start_s + TICK_S},
        "policies": {name: asdict(result) for name, result in results.items()},
        "comparison": compare(results),
    }


def config_from_settings(*, slo_p99_ms: float | None, rps_per_replica: float | None,
                         train_minutes: int, max_replicas: int | None = None,
                         quantile: float | None = None) -> ReplayConfig:
    """The control loop's own settings (LMFORGE_AUTOSCALER_*), with the replay's overrides.

    Capacity is known at one SLO: another SLO needs its own measured capacity.
    """
    from lmforge.settings import load_settings
    from services.cost_autoscaler.settings import AutoscalerSettings

    s = load_settings(AutoscalerSettings)
    slo = slo_p99_ms or s.autoscaler_slo_p99_ms
    if rps_per_replica is None and slo != s.autoscaler_slo_p99_ms:
        raise TraceError(
            f"replica capacity is known at p99 {s.autoscaler_slo_p99_ms:g} ms "
            f"(LMFORGE_AUTOSCALER_RPS_PER_REPLICA={s.autoscaler_rps_per_replica:g} at "
            f"LMFORGE_AUTOSCALER_SLO_P99_MS); for {slo:g} ms measure it with "
            f"benchmarks/gateway_load.py and pass --rps-per-replica")
    policy = replace(s.policy_config(), rps_per_replica=rps_per_replica
                     or s.autoscaler_rps_per_replica,
                     max_replicas=max_replicas or s.autoscaler_max_replicas)
    forecast = s.forecast_config()
    if quantile is not None:
        forecast = replace(forecast, quantile=quantile)
    price = s.autoscaler_price_per_hour.get(s.autoscaler_gateway_hardware)
    if price is None:
        raise TraceError(f"no price for the gateway's hardware "
                         f"{s.autoscaler_gateway_hardware!r} in "
                         f"LMFORGE_AUTOSCALER_PRICE_PER_HOUR ({s.autoscaler_price_per_hour})")
    return ReplayConfig(policy=policy, forecast=forecast, price_per_replica_hour=price,
                        cold_start_s=s.autoscaler_gateway_cold_start_s,
                        train_minutes=train_minutes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmforge scaling replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path, help="CSV: minute,requests_per_s")
    parser.add_argument("--slo-p99-ms", type=float, help="default LMFORGE_AUTOSCALER_SLO_P99_MS")
    parser.add_argument("--rps-per-replica", type=float,
                        help="capacity at that SLO (default LMFORGE_AUTOSCALER_RPS_PER_REPLICA)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--train-days", type=float, default=0.0,
                        help="leading days used as history only, not scored")
    parser.add_argument("--max-replicas", type=int,
                        help="default LMFORGE_AUTOSCALER_MAX_REPLICAS")
    parser.add_argument("--quantile", type=float,
                        help="default LMFORGE_AUTOSCALER_FORECAST_QUANTILE")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        print(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}", file=sys.stderr)
        return 2
    try:
        rates = read_trace(args.trace)
        config = config_from_settings(
            slo_p99_ms=args.slo_p99_ms, rps_per_replica=args.rps_per_replica,
            train_minutes=round(args.train_days * 1440), max_replicas=args.max_replicas,
            quantile=args.quantile)
        report = run_replay(rates, policies, config)
    except (TraceError, ValueError) as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
        return 0
    _print_table(report)
    return 0


def _print_table(report: dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"replay of {report['minutes']} minutes "
                  f"({report['train_minutes']} training)")
    for column in ("policy", "replica-hours", "$", "SLO-violation min", "scale events",
                   "peak replicas", "mean replicas"):
        table.add_column(column)
    policies = report["policies"]
    assert isinstance(policies, dict)
    for name, r in policies.items():
        table.add_row(name, f"{r['replica_hours']:.1f}", f"{r['cost_usd']:.2f}",
                      str(r["slo_violation_minutes"]), str(r["scale_events"]),
                      str(r["peak_replicas"]), f"{r['mean_replicas']:.2f}")
    Console().print(table)
    comparison = report["comparison"]
    assert isinstance(comparison, dict)
    for key, value in comparison.items():
        Console().print(f"{key}: {value}")


if __name__ == "__main__":
    sys.exit(main())
