"""How often to checkpoint: Young/Daly, shared by the scheduler (to plan) and the
trainer (to re-plan once it has measured what a checkpoint costs).

Young (1974) and Daly (2006): with a checkpoint costing C seconds and failures
(here: spot preemptions) arriving with mean time between them M, the interval
τ = √(2·C·M) minimises the expected time lost to writing checkpoints (C/τ of
the run) plus redoing work after a failure (τ/2 per failure, 1/M failures per
second). Without preemptions there is no M: the plan then checkpoints about
every tenth of the run, and at least every minute of work, as before.
"""

from __future__ import annotations

import math

NO_PREEMPTION_SHARE = 10
"""Without a preemption rate: a checkpoint every 1/10 of the run..."""
NO_PREEMPTION_MAX_S = 60.0
"""...and at least every minute of work (a crash loses at most a minute)."""


def young_daly_interval_s(checkpoint_cost_s: float, preemptions_per_hour: float) -> float:
    """√(2 · checkpoint cost · MTBF) in seconds; 0 when nothing preempts (no MTBF)."""
    if preemptions_per_hour <= 0:
        return 0.0
    if checkpoint_cost_s <= 0:
        raise ValueError(f"checkpoint cost {checkpoint_cost_s}s must be positive")
    mtbf_s = 3600.0 / preemptions_per_hour
    return math.sqrt(2.0 * checkpoint_cost_s * mtbf_s)


def checkpoint_interval_steps(*, step_seconds: float, total_steps: int,
                              checkpoint_cost_s: float, preemptions_per_hour: float) -> int:
    """The Young/Daly interval in steps (1..total_steps), or without preemptions the
    smaller of a tenth of the run and a minute of work."""
    if step_seconds <= 0:
        raise ValueError(f"step time {step_seconds}s must be positive")
    interval_s = young_daly_interval_s(checkpoint_cost_s, preemptions_per_hour)
    if interval_s:
        steps = round(interval_s / step_seconds)
    else:
        steps = min(math.ceil(total_steps / NO_PREEMPTION_SHARE),
                    int(NO_PREEMPTION_MAX_S / step_seconds))
    return max(1, min(total_steps, steps))


def expected_overhead_share(*, interval_s: float, checkpoint_cost_s: float,
                            preemptions_per_hour: float, restart_s: float) -> float:
    """Daly's first-order expected overhead as a share of the work: writing
    checkpoints (C/τ) plus, per preemption, half an interval redone and a restart."""
    share = checkpoint_cost_s / interval_s if interval_s > 0 else 0.0
    return share + preemptions_per_hour / 3600.0 * (interval_s / 2 + restart_s)
