"""The run report: folded from a run's events (in progress or done), rendered self-contained."""

from __future__ import annotations

import re

import pytest

from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.report.html import render
from lmforge.report.record import fold_events, histogram_percentiles


def _in_progress():
    return [
        (subjects.DATASET_READY.name, ev.DatasetReady(run_id="r", model_name="m"), 100.0),
        (subjects.DATASET_PREPARED.name, ev.DatasetPrepared(
            run_id="r", model_name="m", stats=ev.DatasetStats(
                records_read=100, records_kept=80,
                dropped={"quality.too_short": 15, "clean.exact_duplicate": 5})), 110.0),
        (subjects.TRAINING_PROGRESS.name, ev.TrainingProgress(
            run_id="r", step=1, total_steps=4, loss=6.0, tokens_per_second=900.0), 120.0),
        (subjects.TRAINING_CHECKPOINTED.name, ev.TrainingCheckpointed(
            run_id="r", step=2, checkpoint_seconds=0.4), 121.0),
        (subjects.TRAINING_PROGRESS.name, ev.TrainingProgress(
            run_id="r", step=3, total_steps=4, loss=5.0, tokens_per_second=1000.0), 122.0),
        (subjects.TRAINING_PREEMPTED.name, ev.TrainingPreempted(
            run_id="r", step=3, reason="spot notice (aws)"), 123.0),
    ]


def test_a_run_in_progress_shows_what_has_happened_and_says_what_has_not():
    record = fold_events("r", _in_progress())
    assert (record.status, record.model_name) == ("training", "m")
    assert record.dropped == {"quality.too_short": 15, "clean.exact_duplicate": 5}
    assert [p["loss"] for p in record.progress] == [6.0, 5.0]
    assert [(t["kind"], t["step"]) for t in record.timeline] == [("checkpoint", 2),
                                                                  ("preempted", 3)]
    page = render(record)
    # Funnel, loss, throughput and timeline are pictures in the page itself.
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 4
    assert "the model has not been quantized yet" in page
    assert "spot notice (aws)" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from outside


def test_a_finished_run_has_its_quantization_table_and_held_out_perplexity():
    events = [*_in_progress(),
              (subjects.MODEL_TRAINED.name, ev.ModelTrained(
                  run_id="r", model_name="m", steps=4, heldout_perplexity=42.5), 130.0),
              (subjects.MODEL_QUANTIZED.name, ev.ModelQuantized(
                  run_id="r", model_name="m", method="awq-int4", bits=4, group_size=128,
                  perplexity_fp=42.5, perplexity_rtn_int4=47.0, perplexity_awq_int4=44.0,
                  passed_quality_gate=True, served="awq-int4"), 140.0),
              (subjects.MODEL_DEPLOYED.name, ev.ModelDeployed(run_id="r", model_name="m"),
               150.0)]
    record = fold_events("r", events)
    assert record.status == "served" and record.heldout == [(4, 42.5)]
    page = render(record)
    assert "<td>AWQ int4</td><td>44.000</td>" in page
    assert "quality gate passed" in page


def test_latency_percentiles_interpolate_inside_buckets_like_promql():
    buckets = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (float("inf"), 100.0)]
    got = histogram_percentiles(buckets)
    assert got["p50"] == pytest.approx(0.1)
    assert got["p90"] == pytest.approx(0.5)
    assert got["p99"] == pytest.approx(0.5 + 0.5 * 0.9)
    assert histogram_percentiles([(0.1, 0.0), (float("inf"), 0.0)]) == {}
