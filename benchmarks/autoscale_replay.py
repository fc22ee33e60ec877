"""Predictive vs reactive vs static autoscaling of the gateway, replayed on a 14-day trace.

    python benchmarks/autoscale_replay.py [--out trace.csv] [--seed 7]

Builds the trace below, writes it as `minute,requests_per_s`, and replays it
with the autoscaler's own policy code (services/cost_autoscaler/replay.py, the
same as `lmforge scaling replay`): the first 7 days are history the forecast
is fitted on, the last 7 are scored. Prints JSON.

The trace (one row a minute, 20160 rows, minute 0 = Monday 00:00), seeded:
- diurnal cycle: a quiet night at 12% of the day's peak, a morning ramp from
  06:00, the peak around 14:00, an evening decline; weekdays peak at 400 req/s;
- weekly cycle: Saturday and Sunday at 55% of a weekday;
- slow ramp: demand grows 2% a day (linear), +28% over the two weeks;
- noise: a slow AR(1) wander (phi 0.98, 3%) times minute-to-minute noise (4%);
- sudden spikes: 8 bursts at seeded random times (3-4 land in the scored week),
  +60-120% on top, 10-40 minutes long, full height at once.

Capacity 20 req/s per replica (the gateway benchmark's rate at the p99 SLO is
set by LMFORGE_AUTOSCALER_RPS_PER_REPLICA; 20 is the default), cold start
120 s, up to 64 replicas, $0.10 per replica-hour (the `cpu` price): the ratios
do not depend on the price. Every other setting is the autoscaler's default.

Targets (issue 12): predictive >= 50% fewer SLO-violation minutes than
reactive at <= 1.05x its cost, and >= 60% cheaper than static peak.

Measured (benchmarks/results/autoscale_replay.json; seed 7, 2 shared cores,
~10 min under load, nearly all of it the 29 MSTL fits): static $873.6 / 0
violation minutes; reactive $178.8 / 1092; predictive $184.9 / 510: -53% violation
minutes at 1.034x reactive, -79% against static. Predictive provisions for the
forecast when the replicas asked for would serve (cold start + one round), at
quantile 0.8, chosen on days 1-7 only (benchmarks/autoscale_tune.py: validation
said -64% at 1.036x; the scored week was not looked at to choose). The first
version, provisioning for the 15-minute peak at quantile 0.9, measured $191.2 /
229 (-79% at 1.07x: over the cost target).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]),
                str(Path(__file__).resolve().parents[1] / "libs")]

DAYS = 14
PEAK_RPS = 400.0


def diurnal(hour: np.ndarray) -> np.ndarray:
    """0.12 at night, 1.0 around 14:00: a raised cosine from 06:00 to 24:00."""
    day = np.clip((hour - 6.0) / 18.0, 0.0, 1.0)
    shape = np.where((hour >= 6.0), np.sin(np.pi * day) ** 1.5, 0.0)
    peak_shift = np.sin(np.pi * np.clip((hour - 6.0) / 18.0, 0, 1)) ** 0.3
    return 0.12 + 0.88 * shape * peak_shift


def build_trace(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    minutes = np.arange(DAYS * 1440)
    hour = (minutes % 1440) / 60.0
    weekday = (minutes // 1440) % 7
    weekly = np.where(weekday >= 5, 0.55, 1.0)
    ramp = 1.0 + 0.02 * minutes / 1440.0
    wander = np.empty(len(minutes))
    level = 0.0
    for i in range(len(minutes)):
        level = 0.98 * level + rng.normal(0.0, 0.03 * math.sqrt(1 - 0.98 ** 2))
        wander[i] = level
    noise = rng.normal(0.0, 0.04, len(minutes))
    rate = PEAK_RPS * diurnal(hour) * weekly * ramp * (1 + wander) * (1 + noise)
    for _ in range(8):
        start = int(rng.integers(0, len(minutes) - 60))
        length = int(rng.integers(10, 41))
        rate[start:start + length] *= 1 + rng.uniform(0.6, 1.2)
    return np.maximum(rate, 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="where to write the trace CSV")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from services.cost_autoscaler.replay import config_from_settings, read_trace, run_replay

    rates = build_trace(args.seed)
    out = args.out or Path(tempfile.mkdtemp()) / "autoscale_trace.csv"
    out.write_text("minute,requests_per_s\n" + "".join(
        f"{m},{r:.3f}\n" for m, r in enumerate(rates)))
    config = config_from_settings(slo_p99_ms=None, rps_per_replica=20.0,
                                  train_minutes=7 * 1440, max_replicas=64)
    report = run_replay(read_trace(out), ["static", "reactive", "predictive"], config)
    comparison = report["comparison"]
    assert isinstance(comparison, dict)
    report = {"benchmark": "autoscale_replay", "trace": str(out), "seed": args.seed,
              "days": DAYS, "scored_days": 7, **report,
              "targets": {"violation_reduction_vs_reactive": 0.5,
                          "cost_ratio_vs_reactive_max": 1.05, "cost_saving_vs_static": 0.6},
              "met": {
                  "violations": comparison.get("violation_reduction_vs_reactive", 0) >= 0.5,
                  "cost_vs_reactive": comparison.get("cost_ratio_vs_reactive", 9) <= 1.05,
                  "cost_vs_static": comparison.get("cost_saving_vs_static", 0) >= 0.6}}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
