"""What a run report shows, folded from the run's events, its cost ledger entry and the
gateway's latency histogram.

The event stream is the run's record (as for `lmforge runs`), so a report of a run
still in progress shows what has happened so far: the funnel once data-prep is done,
the loss curve up to the last progress event, no quantization table yet. Nothing is
estimated: a part with no data says so in the page.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from google.protobuf.message import Message

from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev

PERCENTILES = (0.5, 0.9, 0.99)


@dataclass(slots=True)
class RunRecord:
    run_id: str
    model_name: str = ""
    status: str = "queued"
    records_read: int = 0
    records_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Documents data-prep dropped, per reason code."""
    progress: list[dict[str, float]] = field(default_factory=list)
    """Per training.progress: step, loss, learning_rate, tokens_per_second, mfu, time."""
    heldout: list[tuple[int, float]] = field(default_factory=list)
    """(step, held-out perplexity) where it was measured (the end of training)."""
    timeline: list[dict[str, Any]] = field(default_factory=list)
    """Checkpoints and preemptions: kind, step, time, seconds, reason."""
    quantization: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    """The run's cost ledger entry (charges per stage, totals), as the autoscaler wrote it."""
    latency: dict[str, float] = field(default_factory=dict)
    """Serving latency percentiles ("p50", "p90", "p99") from the gateway's histogram."""
    latency_note: str = ""
    failure: str = ""
    started: float = 0.0
    updated: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def fold_events(run_id: str, events: Iterable[tuple[str, Message, float]]) -> RunRecord:
    """The record of `run_id` from its events, oldest first: (subject, event, unix time)."""
    record = RunRecord(run_id)
    for subject, event, ts in events:
        record.started = record.started or ts
        record.updated = ts
        name = event.DESCRIPTOR.fields_by_name.get("model_name")
        if name is not None:
            record.model_name = str(getattr(event, name.name)) or record.model_name
        if subject == subjects.DATASET_READY.name:
            record.status = "preparing data"
        elif isinstance(event, ev.DatasetPrepared):
            record.status = "scheduling"
            record.records_read = event.stats.records_read
            record.records_kept = event.stats.records_kept
            record.dropped = dict(event.stats.dropped)
        elif isinstance(event, ev.TrainingScheduled):
            record.status = "training"
        elif isinstance(event, ev.TrainingProgress):
            record.status = "training"
            record.progress.append({
                "step": event.step, "total_steps": event.total_steps, "loss": event.loss,
                "learning_rate": event.learning_rate,
                "tokens_per_second": event.tokens_per_second, "mfu": event.mfu, "time": ts})
        elif isinstance(event, ev.TrainingCheckpointed):
            record.timeline.append({"kind": "checkpoint", "step": event.step, "time": ts,
                                    "seconds": event.checkpoint_seconds, "reason": ""})
        elif isinstance(event, ev.TrainingPreempted):
            record.timeline.append({"kind": "preempted", "step": event.step, "time": ts,
                                    "seconds": 0.0, "reason": event.reason})
        elif isinstance(event, ev.ModelTrained):
            record.status = "quantizing"
            record.heldout.append((event.steps, event.heldout_perplexity))
        elif isinstance(event, ev.ModelQuantized):
            record.status = "exporting"
            record.quantization = {
                "method": event.method, "bits": event.bits, "group_size": event.group_size,
                "perplexity_fp": event.perplexity_fp,
                "perplexity_rtn_int4": event.perplexity_rtn_int4,
                "perplexity_awq_int4": event.perplexity_awq_int4,
                "passed_quality_gate": event.passed_quality_gate, "served": event.served,
                "served_reason": event.served_reason, "seconds": event.quantize_seconds}
        elif isinstance(event, ev.ModelExported):
            record.status = "deploying"
        elif isinstance(event, ev.ModelDeployed):
            record.status = "served"
        elif isinstance(event, ev.StageFailed):
            record.status = "failed"
            record.failure = f"{event.stage}: {event.reason}"
    return record


def histogram_percentiles(buckets: list[tuple[float, float]]) -> dict[str, float]:
    """Percentiles from cumulative Prometheus buckets [(le, count)], interpolated linearly
    inside a bucket as PromQL's histogram_quantile does. {} when nothing was observed."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return {}
    found: dict[str, float] = {}
    for q in PERCENTILES:
        rank = q * total
        lower_le, lower_count = 0.0, 0.0
        for le, count in buckets:
            if count >= rank:
                if math.isinf(le):  # past the last finite bound: the bound is all we know
                    value = lower_le
                else:
                    width = count - lower_count
                    value = lower_le + (le - lower_le) * ((rank - lower_count) / width
                                                          if width else 1.0)
                found[f"p{round(q * 100)}"] = value
                break
            lower_le, lower_count = le, count
    return found
