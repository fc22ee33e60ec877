"""The training loop: exact resume, corrupt checkpoints, a usable output directory."""

from __future__ import annotations

import logging

import pytest

from lmforge.modeling import load_causal_lm, load_tokenizer
from services.trainer.checkpoints import CheckpointIndex
from services.trainer.training import Trainer
from tests.conftest import tiny_train_config


def _trainer(tmp_path, store, dataset, run_id, **overrides):
    config = tiny_train_config(**{"max_steps": 8, "checkpoint_interval": 2, **overrides})
    return Trainer(config, dataset.path, store, CheckpointIndex(tmp_path, run_id, store))


def test_resume_gives_the_same_losses_as_one_uninterrupted_run(tmp_path, artifact_store,
                                                               prepared_dataset):
    whole = _trainer(tmp_path, artifact_store, prepared_dataset, "whole").run()

    first = _trainer(tmp_path, artifact_store, prepared_dataset, "split")
    stop = __import__("threading").Event()
    part = first.run(stop=stop, on_checkpoint=lambda ref: ref.step >= 4 and stop.set())
    assert part.preempted and part.step == 5  # the step in flight finishes, then it stops

    rest = _trainer(tmp_path, artifact_store, prepared_dataset, "split").run()
    assert rest.resumed_from_step == 5
    assert part.losses + rest.losses == pytest.approx(whole.losses, abs=1e-6)
    assert rest.heldout_perplexity == pytest.approx(whole.heldout_perplexity, rel=1e-6)


def test_corrupt_newest_checkpoint_is_refused_and_the_previous_one_used(
        tmp_path, artifact_store, prepared_dataset, caplog):
    whole = _trainer(tmp_path, artifact_store, prepared_dataset, "ref").run()
    stop = __import__("threading").Event()
    _trainer(tmp_path, artifact_store, prepared_dataset, "corrupt").run(
        stop=stop, on_checkpoint=lambda ref: ref.step >= 6 and stop.set())
    index = CheckpointIndex(tmp_path, "corrupt", artifact_store)
    newest = index.entries()[-1]
    weights = artifact_store.get_dir(newest.digest, verify=False) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING):
        resumed = _trainer(tmp_path, artifact_store, prepared_dataset, "corrupt").run()
    assert f"checkpoint at step {newest.step} refused" in caplog.text
    assert "corrupt" in caplog.text
    assert resumed.resumed_from_step == index.entries()[-2].step
    assert resumed.losses == pytest.approx(whole.losses[resumed.resumed_from_step:], abs=1e-6)


def test_output_is_a_hugging_face_directory_that_generates(trained_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(trained_model.path))
    assert model.config.model_type == "llama"
    tokenizer = load_tokenizer(trained_model.path)
    ids = tokenizer("A fortune", return_tensors="pt").input_ids
    out = load_causal_lm(trained_model.path).generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5 or out[0, -1] == model.config.eos_token_id
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (trained_model.path / name).is_file()


@pytest.mark.parametrize(("family", "precision"), [("qwen2", "fp32"), ("llama", "fp16"),
                                                   ("llama", "bf16")])
def test_families_and_precisions_train(tmp_path, artifact_store, prepared_dataset, family,
                                       precision):
    config = tiny_train_config(max_steps=6, precision=precision)
    config.model.family = family
    trainer = Trainer(config, prepared_dataset.path, artifact_store,
                      CheckpointIndex(tmp_path, f"{family}-{precision}", artifact_store))
    result = trainer.run()
    assert trainer.hf_config.model_type == family
    assert result.losses[-1] < result.losses[0]
    assert result.heldout_perplexity > 1 and result.peak_memory_bytes > 0


def test_config_errors_name_the_field():
    from services.trainer.config import ConfigError, EngineConfig, ModelSpec

    with pytest.raises(ConfigError, match=r"model\.hidden_size 100 is not divisible"):
        ModelSpec(hidden_size=100, num_heads=3)
    with pytest.raises(ConfigError, match="ZeRO stages and offload need"):
        EngineConfig(kind="plain", zero_stage=2)
    with pytest.raises(ConfigError, match=r"engine\.precision 'fp8'"):
        EngineConfig(precision="fp8")


def test_the_time_budget_stops_the_run_at_a_checkpoint_with_the_steps_reached(
        tmp_path, artifact_store, prepared_dataset):
    config = tiny_train_config(max_steps=100_000, checkpoint_interval=100_000)
    config.schedule.time_budget_s = 1.5
    trainer = Trainer(config, prepared_dataset.path, artifact_store,
                      CheckpointIndex(tmp_path, "budget", artifact_store))
    checkpoints = []
    result = trainer.run(on_checkpoint=checkpoints.append)
    assert result.stopped_at_budget and not result.preempted
    assert 1 <= result.step < result.planned_steps == 100_000
    assert result.wall_seconds < 1.5 + 30  # stopped, then evaluated and saved the model
    # It checkpointed where it stopped (the interval alone would never have).
    assert [ref.step for ref in checkpoints] == [result.step] and checkpoints[0].seconds > 0
    assert result.model_dir is not None and result.train_tokens == result.step * 8 * 64


def test_calibration_reports_flops_and_leaves_training_unchanged(tmp_path, artifact_store,
                                                                 prepared_dataset):
    progress = []
    calibrated = _trainer(tmp_path, artifact_store, prepared_dataset, "calibrated")
    run = calibrated.run(on_progress=progress.append)
    first = progress[0]
    assert first.measured_flops > 0 and "before the first step" in first.calibration
    assert all(p.measured_flops == 0 for p in progress[1:])  # reported once
    uncalibrated = _trainer(tmp_path, artifact_store, prepared_dataset, "plain")
    uncalibrated.calibrate = lambda flops_per_token: (0.0, "")  # type: ignore[method-assign]
    assert run.losses == pytest.approx(uncalibrated.run().losses, abs=1e-6)


def test_peak_memory_is_the_training_steps_not_what_the_process_held_before(
        tmp_path, artifact_store, prepared_dataset):
    """A transient before the loop (a base model's load, an earlier job of the same
    trainer process) is not counted as training memory."""
    import numpy as np

    from services.trainer.training import PROC_CLEAR_REFS, peak_memory_bytes

    if not PROC_CLEAR_REFS.exists():
        pytest.skip("no /proc/self/clear_refs: the peak is the process's lifetime peak")
    trainer = _trainer(tmp_path, artifact_store, prepared_dataset, "peak", max_steps=2)
    transient = np.ones(384 * 2**20 // 8)  # 384 MiB, touched, then given back
    del transient
    before = peak_memory_bytes(trainer.device)
    result = trainer.run()
    assert 0 < result.peak_memory_bytes < before - 256 * 2**20
