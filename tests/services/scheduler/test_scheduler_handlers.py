"""The scheduler's handlers on both buses: a plan for a prepared dataset, a clear
refusal for one too small to train, and a preempted job scheduled again."""

from __future__ import annotations

import asyncio

from lmforge.catalog import load_catalog
from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from services.scheduler.handlers import SchedulerService


def _prepared(run_id: str, train_tokens: int) -> ev.DatasetPrepared:
    return ev.DatasetPrepared(
        run_id=run_id, model_name="m", vocab_size=1024, seq_len=64, time_budget_s=30,
        dataset=ev.ArtifactRef(digest="sha256:" + "ab" * 32),
        stats=ev.DatasetStats(train_tokens=train_tokens))


def test_prepared_dataset_is_planned_and_a_tiny_one_refused(harness, tmp_path):
    async def scenario():
        async with harness.service(SchedulerService, home=tmp_path):
            await harness.publish(_prepared("ok", 200_000), "ok")
            await harness.publish(_prepared("tiny", 10), "tiny")
            (scheduled,) = await harness.wait_for(subjects.TRAINING_SCHEDULED, 1, run_id="ok")
            (failed,) = await harness.wait_for(subjects.STAGE_FAILED, 1, run_id="tiny")
            return scheduled, failed

    scheduled, failed = asyncio.run(scenario())
    assert scheduled.plan.max_steps >= 1 and scheduled.plan.seq_len == 64
    local = load_catalog().types["local-cpu"]
    plan = scheduled.plan
    assert plan.precision == local.native_precision() and plan.vocab_size == 1024
    assert (plan.instance_type, plan.device, plan.market) == ("local-cpu", "cpu", "on-demand")
    assert plan.time_budget_s == 30 and plan.estimated_seconds <= 30
    assert plan.estimated_usd == 0 and plan.throughput_source == "catalog"
    assert "fewer than one sequence of 64" in failed.reason and not failed.dead_lettered


def test_preempted_job_is_scheduled_again_as_the_next_attempt(harness, tmp_path):
    job = ev.TrainingScheduled(run_id="spot", model_name="m", attempt=1,
                               plan=ev.ResourcePlan(max_steps=40))

    async def scenario():
        async with harness.service(SchedulerService, home=tmp_path):
            await harness.publish(ev.TrainingPreempted(
                run_id="spot", step=12, scheduled=job,
                checkpoint=ev.ArtifactRef(digest="sha256:" + "cd" * 32)), "spot:preempted")
            return await harness.wait_for(subjects.TRAINING_SCHEDULED, 1, run_id="spot")

    (again,) = asyncio.run(scenario())
    assert again.attempt == 2 and again.plan.max_steps == 40
