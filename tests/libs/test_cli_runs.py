"""`lmforge runs` / `run --follow`: a run's state folded from its events."""

from __future__ import annotations

from lmforge.cli.runs import STAGES, RunView
from lmforge.contracts import subjects
from lmforge.contracts.names import SERVICES, ServiceName
from lmforge.contracts.v1 import events_pb2 as ev


def test_the_stages_are_the_services_a_run_passes_through_in_order():
    assert tuple(s for s in SERVICES if s is not ServiceName.COST_AUTOSCALER) == STAGES


def test_a_run_is_folded_stage_by_stage_until_served():
    view = RunView("r1")
    steps = [
        (subjects.DATASET_READY, ev.DatasetReady(run_id="r1", model_name="m"), "data-prep",
         "queued"),
        (subjects.DATASET_PREPARED, ev.DatasetPrepared(run_id="r1"), "scheduler", "running"),
        (subjects.TRAINING_SCHEDULED,
         ev.TrainingScheduled(run_id="r1", plan=ev.ResourcePlan(max_steps=40)), "trainer",
         "queued"),
        (subjects.TRAINING_PROGRESS, ev.TrainingProgress(run_id="r1", step=10, total_steps=40,
                                                         loss=2.5), "trainer", "running"),
        (subjects.MODEL_TRAINED, ev.ModelTrained(run_id="r1", heldout_perplexity=12.5,
                                                 steps=40), "quantizer", "running"),
        (subjects.MODEL_QUANTIZED, ev.ModelQuantized(run_id="r1"), "exporter", "running"),
        (subjects.MODEL_EXPORTED, ev.ModelExported(run_id="r1"), "inference-gateway",
         "running"),
        (subjects.MODEL_DEPLOYED, ev.ModelDeployed(run_id="r1"), "inference-gateway", "served"),
    ]
    for t, (subject, event, stage, status) in enumerate(steps):
        view.fold(subject.name, event, float(t))
        assert (view.stage, view.status) == (stage, status), subject.name
        if subject is subjects.TRAINING_PROGRESS:
            assert (view.step, view.total_steps, view.loss) == (10, 40, 2.5)
    assert view.finished and view.model_name == "m"
    assert (view.perplexity, view.step) == (12.5, 40)
    assert list(view.stage_done_at) == list(STAGES)


def test_a_failed_stage_ends_the_run_with_its_reason():
    view = RunView("r2")
    view.fold(subjects.DATASET_READY.name, ev.DatasetReady(run_id="r2"), 1.0)
    view.fold(subjects.STAGE_FAILED.name,
              ev.StageFailed(run_id="r2", stage="data-prep", reason="no such file"), 2.0)
    assert view.finished and view.status == "failed"
    assert (view.stage, view.failure) == ("data-prep", "data-prep: no such file")


def test_stages_replayed_from_the_cache_say_which_run_they_reused():
    view = RunView("again")
    view.fold(subjects.DATASET_READY.name, ev.DatasetReady(run_id="again"), 0.0)
    view.fold(subjects.DATASET_PREPARED.name, ev.DatasetPrepared(run_id="again"), 1.0,
              cached_from="first")
    view.fold(subjects.TRAINING_SCHEDULED.name, ev.TrainingScheduled(run_id="again"), 2.0)
    assert view.reused_from == {"data-prep": "first"}


def test_a_resumed_training_shows_a_resume_not_a_step_counter_going_back():
    view = RunView("r")
    view.fold(subjects.TRAINING_SCHEDULED.name,
              ev.TrainingScheduled(run_id="r", plan=ev.ResourcePlan(max_steps=100)), 0.0)
    view.fold(subjects.TRAINING_PROGRESS.name,
              ev.TrainingProgress(run_id="r", step=68, total_steps=100, delivery=1), 1.0)
    # The trainer was killed; its job resumed from the checkpoint at step 50.
    view.fold(subjects.TRAINING_PROGRESS.name,
              ev.TrainingProgress(run_id="r", step=51, total_steps=100, delivery=2), 2.0)
    # A late event of the first delivery does not move the view back.
    view.fold(subjects.TRAINING_PROGRESS.name,
              ev.TrainingProgress(run_id="r", step=69, total_steps=100, delivery=1), 3.0)
    assert (view.step, view.resumes, view.resumed_at_step) == (51, 1, 51)


def test_runs_waiting_for_a_trainer_are_queued_with_their_position():
    from lmforge.cli.runs import number_queue

    views = []
    for t, run_id in enumerate(("training", "first-waiting", "second-waiting")):
        view = RunView(run_id)
        view.fold(subjects.TRAINING_SCHEDULED.name, ev.TrainingScheduled(run_id=run_id),
                  float(t))
        views.append(view)
    views[0].fold(subjects.TRAINING_PROGRESS.name,
                  ev.TrainingProgress(run_id="training", step=3, delivery=1), 5.0)
    number_queue(views)
    assert [(v.status, v.queue_position) for v in views] == [
        ("running", 0), ("queued", 1), ("queued", 2)]


def test_data_prep_counts_are_shown_for_a_run():
    view = RunView("r")
    view.fold(subjects.DATASET_PREPARED.name, ev.DatasetPrepared(
        run_id="r", stats=ev.DatasetStats(records_read=10, records_kept=7,
                                          dropped={"quality.too_short": 3})), 0.0)
    assert view.data_kept == "7/10" and view.data_dropped == {"quality.too_short": 3}


def test_the_quantizers_comparison_and_the_served_precision_are_shown():
    view = RunView("q")
    view.fold(subjects.MODEL_QUANTIZED.name, ev.ModelQuantized(
        run_id="q", method="awq-int4", perplexity_before=12.4, perplexity_after=12.6,
        perplexity_fp=12.4, perplexity_rtn_int4=12.95, perplexity_awq_int4=12.6,
        passed_quality_gate=True, served="awq-int4"), 1.0)
    assert view.quantization == "awq-int4 ppl 12.60 (fp 12.40, RTN int4 12.95, AWQ int4 12.60)"
    view.fold(subjects.MODEL_DEPLOYED.name, ev.ModelDeployed(run_id="q",
                                                             precision="int4-awq-g128"), 2.0)
    assert view.served == "int4-awq-g128"


def test_a_fallback_to_fp32_says_why_in_the_run():
    view = RunView("f")
    reason = "quality gate failed: awq-int4 held-out perplexity 14.000 is +12.9% ..."
    view.fold(subjects.MODEL_QUANTIZED.name, ev.ModelQuantized(
        run_id="f", method="awq-int4", perplexity_before=12.4, perplexity_after=14.0,
        perplexity_fp=12.4, perplexity_awq_int4=14.0, passed_quality_gate=False,
        served="fp32", served_reason=reason), 1.0)
    assert view.quantization.endswith("gate failed)")
    assert view.served == f"fp32: {reason}"
    view.fold(subjects.MODEL_DEPLOYED.name, ev.ModelDeployed(
        run_id="f", precision="fp32", precision_reason=reason), 2.0)
    assert view.served == f"fp32: {reason}"


def test_a_run_that_starts_training_leaves_the_queue_when_numbered_again():
    """The status page folds the same views on and numbers them after every poll."""
    from lmforge.cli.runs import number_queue

    views = [RunView(run_id) for run_id in ("first", "second")]
    for t, view in enumerate(views):
        view.fold(subjects.TRAINING_SCHEDULED.name, ev.TrainingScheduled(run_id=view.run_id),
                  float(t))
    number_queue(views)
    views[0].fold(subjects.TRAINING_PROGRESS.name,
                  ev.TrainingProgress(run_id="first", step=1, delivery=1), 5.0)
    number_queue(views)
    assert [(v.status, v.queue_position) for v in views] == [("running", 0), ("queued", 1)]


def test_eval_figures_are_shown_for_the_fp_and_the_served_quantized_weights():
    from lmforge.cli.runs import run_json, task_eval_summary

    view = RunView("e")
    view.fold(subjects.MODEL_TRAINED.name, ev.ModelTrained(
        run_id="e", task_eval=ev.TaskEval(examples=40, exact_match=0.65, macro_f1=0.6,
                                          labels=3)), 1.0)
    assert view.task_eval == {"fp": {"examples": 40, "exact_match": 0.65, "macro_f1": 0.6,
                                     "labels": 3}, "served": ""}
    view.fold(subjects.MODEL_QUANTIZED.name, ev.ModelQuantized(
        run_id="e", method="awq-int4", passed_quality_gate=True, served="awq-int4",
        task_eval_fp=ev.TaskEval(examples=40, exact_match=0.65, macro_f1=0.6, labels=3),
        task_eval_quantized=ev.TaskEval(examples=40, exact_match=0.625, macro_f1=0.55,
                                        labels=3)), 2.0)
    assert view.task_eval["awq-int4"]["exact_match"] == 0.625
    assert view.task_eval["served"] == "awq-int4"
    assert task_eval_summary(view.task_eval) == \
        "fp EM 0.65 F1 0.60, awq-int4* EM 0.62 F1 0.55"
    assert run_json(view, {})["task_eval"] == view.task_eval


def test_a_fallback_to_fp32_serves_the_fp_figures_and_a_run_without_eval_set_has_none():
    from lmforge.cli.runs import run_json, task_eval_summary

    view = RunView("f")
    view.fold(subjects.MODEL_QUANTIZED.name, ev.ModelQuantized(
        run_id="f", method="awq-int4", passed_quality_gate=False, served="fp32",
        served_reason="quality gate failed: exact match drop 0.200 > 0.050",
        task_eval_fp=ev.TaskEval(examples=20, exact_match=0.7, macro_f1=0.7, labels=2),
        task_eval_quantized=ev.TaskEval(examples=20, exact_match=0.5, macro_f1=0.4,
                                        labels=2)), 1.0)
    assert view.task_eval["served"] == "fp"
    assert task_eval_summary(view.task_eval).startswith("fp* EM 0.70")
    plain = RunView("p")
    plain.fold(subjects.MODEL_TRAINED.name, ev.ModelTrained(run_id="p"), 1.0)
    plain.fold(subjects.MODEL_QUANTIZED.name, ev.ModelQuantized(
        run_id="p", method="awq-int4", passed_quality_gate=True, served="awq-int4"), 2.0)
    assert plain.task_eval == {} and task_eval_summary(plain.task_eval) == ""
    assert run_json(plain, {})["task_eval"] is None
