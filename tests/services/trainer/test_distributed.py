"""Two ranks on one machine through torchrun (gloo): ZeRO-2/3 train, resume exactly."""

from __future__ import annotations

import threading

import pytest

from services.trainer.checkpoints import CheckpointIndex
from services.trainer.distributed import launch, write_job
from tests.conftest import tiny_train_config

pytestmark = pytest.mark.distributed


def _run(tmp_path, store, dataset, run_id, config, *, stop_after=None):
    job = write_job(tmp_path / f"job-{run_id}", config=config, dataset_dir=dataset.path,
                    store_root=store.root, checkpoint_root=tmp_path / "ckpt", run_id=run_id)
    stop = threading.Event()
    progress = []

    def on_checkpoint(ref):
        if stop_after is not None and ref.step >= stop_after:
            stop.set()

    result = launch(job, 2, stop=stop, on_progress=progress.append,
                    on_checkpoint=on_checkpoint, log_path=tmp_path / f"{run_id}.log")
    return result, progress


def test_plain_engine_with_two_ranks_keeps_the_replicas_in_step(tmp_path, artifact_store,
                                                               prepared_dataset):
    config = tiny_train_config(max_steps=6, checkpoint_interval=100, world_size=2,
                               grad_accum=2)
    result, _ = _run(tmp_path, artifact_store, prepared_dataset, "ddp", config)
    assert result.step == 6 and result.model_dir is not None
    assert result.losses[-1] < result.losses[0]
    assert result.train_tokens == 6 * 2 * 2 * config.batch.micro_batch * config.batch.seq_len


def test_zero2_with_two_ranks_trains(tmp_path, artifact_store, prepared_dataset):
    config = tiny_train_config(max_steps=6, checkpoint_interval=3, engine="deepspeed",
                               zero_stage=2, world_size=2)
    result, _ = _run(tmp_path, artifact_store, prepared_dataset, "zero2", config)
    assert result.step == 6 and result.losses[-1] < result.losses[0]
    assert result.heldout_perplexity > 1


@pytest.mark.parametrize("zero_stage", [3])
def test_zero_with_two_ranks_resumes_exactly(tmp_path, artifact_store, prepared_dataset,
                                             zero_stage):
    config = tiny_train_config(max_steps=8, checkpoint_interval=2, engine="deepspeed",
                               zero_stage=zero_stage, world_size=2)
    whole, progress = _run(tmp_path, artifact_store, prepared_dataset, "ds-whole", config)
    assert not whole.preempted and whole.step == 8 and whole.model_dir is not None
    assert progress and progress[-1].step == 8

    part, _ = _run(tmp_path, artifact_store, prepared_dataset, "ds-split", config, stop_after=2)
    assert part.preempted and 2 <= part.step < 8
    rest, _ = _run(tmp_path, artifact_store, prepared_dataset, "ds-split", config)
    assert rest.resumed_from_step == part.step
    assert part.losses + rest.losses == pytest.approx(whole.losses, abs=1e-6)
    assert rest.heldout_perplexity == pytest.approx(whole.heldout_perplexity, rel=1e-5)
    index = CheckpointIndex(tmp_path / "ckpt", "ds-split", artifact_store)
    assert index.latest_good() is not None


def test_a_cuda_group_also_reduces_the_trainers_cpu_tensors():
    """NCCL alone has no CPU backend; the trainer all-reduces a CPU tensor each step. The
    mixed backend string is what torch's init_process_group takes (no GPU here to run it)."""
    from services.trainer.worker import process_group_backend

    assert process_group_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("cpu") == "gloo"
    from torch.distributed.distributed_c10d import BackendConfig

    assert BackendConfig(process_group_backend("cuda")).get_device_backend_map() == {
        "cpu": "gloo", "cuda": "nccl"}
