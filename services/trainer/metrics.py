"""The trainer's Prometheus series: what a training job is doing, scraped live.

The same figures travel as training.progress events (the run's record); these are
the operator's view: a dashboard of every job, and alert rules such as "trainer
stalled" (a job active while `lmforge_trainer_steps_total` stands still). Gauges
are labelled by run id and keep their last value after the job, so a finished
run's loss and perplexity stay readable; a trainer sees few runs in its life.

Step seconds are per progress window (the loop reports at most once a second):
wall time over the steps since the last report, observed once per window.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from services.trainer.checkpoints import CheckpointRef
from services.trainer.training import Progress, TrainResult

LOSS = Gauge("lmforge_trainer_loss", "Training loss at the last reported step.", ["run_id"])
LEARNING_RATE = Gauge("lmforge_trainer_learning_rate", "Learning rate at the last reported step.",
                      ["run_id"])
TOKENS_PER_SECOND = Gauge("lmforge_trainer_tokens_per_second",
                          "Training tokens per second over the last progress window.",
                          ["run_id"])
MFU = Gauge("lmforge_trainer_mfu_ratio",
            "Model FLOPs utilisation against LMFORGE_TRAINER_PEAK_TFLOPS (absent when unset).",
            ["run_id"])
STEP = Gauge("lmforge_trainer_step", "Last optimizer step reported.", ["run_id"])
TOTAL_STEPS = Gauge("lmforge_trainer_total_steps", "Steps the plan asks for.", ["run_id"])
STEPS = Counter("lmforge_trainer_steps_total", "Optimizer steps taken, every job together.")
STEP_SECONDS = Histogram("lmforge_trainer_step_seconds",
                         "Seconds per optimizer step, averaged over a progress window.",
                         buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
CHECKPOINT_SECONDS = Histogram("lmforge_trainer_checkpoint_seconds",
                               "Wall time to write and store one checkpoint.",
                               buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
CHECKPOINTS = Counter("lmforge_trainer_checkpoints_total", "Checkpoints stored.")
HELDOUT_PERPLEXITY = Gauge("lmforge_trainer_heldout_perplexity",
                           "Held-out perplexity of the finished model.", ["run_id"])
ACTIVE_JOBS = Gauge("lmforge_trainer_active_jobs", "Training jobs running in this process.")
JOBS = Counter("lmforge_trainer_jobs_total",
               "Training jobs ended, by outcome (trained, preempted, failed).", ["outcome"])


class JobMetrics:
    """Feeds the series from one job's callbacks (they run on the training thread)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._last: tuple[float, int] | None = None

    def __enter__(self) -> JobMetrics:
        ACTIVE_JOBS.inc()
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        ACTIVE_JOBS.dec()
        if kind is not None:
            JOBS.labels("failed").inc()

    def progress(self, p: Progress, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        run = self.run_id
        LOSS.labels(run).set(p.loss)
        LEARNING_RATE.labels(run).set(p.learning_rate)
        TOKENS_PER_SECOND.labels(run).set(p.tokens_per_second)
        if p.mfu > 0:
            MFU.labels(run).set(p.mfu)
        STEP.labels(run).set(p.step)
        TOTAL_STEPS.labels(run).set(p.total_steps)
        if self._last is not None:
            then, step = self._last
            steps = p.step - step
            if steps > 0:
                STEPS.inc(steps)
                STEP_SECONDS.observe((now - then) / steps)
        self._last = (now, p.step)

    def checkpoint(self, ref: CheckpointRef) -> None:
        CHECKPOINTS.inc()
        if ref.seconds > 0:
            CHECKPOINT_SECONDS.observe(ref.seconds)

    def finished(self, result: TrainResult) -> None:
        if result.preempted:
            JOBS.labels("preempted").inc()
            return
        JOBS.labels("trained").inc()
        if result.heldout_perplexity > 0:
            HELDOUT_PERPLEXITY.labels(self.run_id).set(result.heldout_perplexity)
