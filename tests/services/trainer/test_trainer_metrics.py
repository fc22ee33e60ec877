"""The trainer's /metrics: a job's loss, rate, steps, checkpoint time and perplexity; GPUs."""

from __future__ import annotations

import sys

from prometheus_client import REGISTRY, generate_latest

from services.trainer.checkpoints import CheckpointIndex
from services.trainer.gpu_metrics import NvmlCollector, UnavailableCollector, nvml_collector
from services.trainer.metrics import JobMetrics
from services.trainer.training import Trainer
from tests.conftest import tiny_train_config


def _value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_a_training_job_sets_its_series(tmp_path, artifact_store, prepared_dataset):
    config = tiny_train_config(max_steps=6, checkpoint_interval=2)
    trainer = Trainer(config, prepared_dataset.path, artifact_store,
                      CheckpointIndex(tmp_path, "metered", artifact_store), peak_flops=1e11)
    steps_before = _value("lmforge_trainer_steps_total") or 0.0
    checkpoints_before = _value("lmforge_trainer_checkpoint_seconds_count") or 0.0
    metrics = JobMetrics("metered")
    with metrics:
        assert _value("lmforge_trainer_active_jobs") == 1
        result = trainer.run(on_progress=metrics.progress, on_checkpoint=metrics.checkpoint,
                             progress_every_s=0.0)
        metrics.finished(result)
    assert _value("lmforge_trainer_active_jobs") == 0
    assert _value("lmforge_trainer_step", run_id="metered") == 6
    assert _value("lmforge_trainer_loss", run_id="metered") == result.losses[-1]
    assert (_value("lmforge_trainer_learning_rate", run_id="metered") or 0) > 0
    assert (_value("lmforge_trainer_tokens_per_second", run_id="metered") or 0) > 0
    assert (_value("lmforge_trainer_mfu_ratio", run_id="metered") or 0) > 0
    # Reported every step: the first report opens the window, five steps follow it.
    assert _value("lmforge_trainer_steps_total") == steps_before + 5
    assert (_value("lmforge_trainer_step_seconds_count") or 0) >= 5
    # Checkpoints at steps 2 and 4, each timed (the last step saves the model instead).
    assert _value("lmforge_trainer_checkpoint_seconds_count") == checkpoints_before + 2
    assert (_value("lmforge_trainer_checkpoint_seconds_sum") or 0) > 0
    assert _value("lmforge_trainer_heldout_perplexity",
                  run_id="metered") == result.heldout_perplexity > 1
    assert _value("lmforge_trainer_jobs_total", outcome="trained") >= 1


def test_without_nvidia_ml_py_the_gpu_metrics_say_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    collector = nvml_collector()
    assert isinstance(collector, UnavailableCollector)
    text = _exposition(collector)
    assert 'lmforge_gpu_metrics_available{reason="nvidia-ml-py not installed"} 0.0' in text


def test_gpu_metrics_come_from_nvml_when_it_answers_and_say_why_not_otherwise():
    """On a GPU machine every device's utilisation, memory and power; elsewhere the NVML
    error (no driver) as the reason."""
    collector = nvml_collector()
    text = _exposition(collector)
    if isinstance(collector, NvmlCollector):
        total = [line for line in text.splitlines()
                 if line.startswith("lmforge_gpu_memory_total_bytes{")]
        assert total and all(float(line.split()[-1]) > 0 for line in total), text
        for name in ("utilization_ratio", "memory_used_bytes", "power_watts"):
            assert f"lmforge_gpu_{name}{{gpu=\"0\"" in text, text
    else:
        assert 'lmforge_gpu_metrics_available{reason="NVML unavailable' in text \
            or 'reason="no GPU"' in text, text


def _exposition(collector) -> str:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()
