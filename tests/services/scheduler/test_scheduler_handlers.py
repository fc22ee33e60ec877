"""The scheduler's handlers on both buses: a plan for a prepared dataset, a clear
refusal for one too small to train, and a preempted job scheduled again."""

from __future__ import annotations

import asyncio

import pytest

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


def test_every_trainer_option_is_reachable_from_the_run_request():
    from services.scheduler.handlers import plan_request, plan_to_proto
    from services.scheduler.planner import PlanError, plan_training
    from services.scheduler.settings import SchedulerSettings
    from services.trainer.config import TrainConfig

    settings = SchedulerSettings(scheduler_instance_types=["gcp-t4", "local-cpu"])
    pool = load_catalog().select(settings.scheduler_instance_types)
    event = _prepared("opts", 2_000_000)
    event.time_budget_s = 600  # room for torch.compile's warm-up
    event.training.CopyFrom(ev.TrainingRequest(
        model_size="small", family="qwen2", compile="on", grad_accum=4, global_batch=16,
        instance_types=["gcp-t4"]))
    request = plan_request(event, settings, pool)
    report = plan_training(request, [i for i in pool if i.name in request.instance_types])
    config = TrainConfig.from_plan(plan_to_proto(report.plan))
    assert config.model.family == "qwen2" and config.engine.compile
    assert config.engine.precision == "fp16"  # a T4 has no bf16: fp16 with the scaler
    assert (config.batch.micro_batch, config.batch.grad_accum) == (4, 4)
    assert config.schedule.time_budget_s == 600
    assert config.checkpoint.preemptions_per_hour == report.plan.option.instance \
        .preemptions_per_hour(report.plan.option.market)
    event.training.instance_types[:] = ["aws-p5-h100"]
    with pytest.raises(PlanError, match=r"\['aws-p5-h100'\] asked for, but this "
                                        r"scheduler's pool offers \['gcp-t4', 'local-cpu'\]"):
        plan_request(event, settings, pool)
