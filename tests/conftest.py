"""Shared fixtures: a real nats-server per test (random ports, its own store)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmforge.runtime.nats_server import NatsServer

# Two busy cores make OpenMP spin; every test process and child stays passive.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = REPO_ROOT / "tests" / "data"


@pytest.fixture
def nats_server(tmp_path: Path):
    server = NatsServer(store_dir=tmp_path / "nats", log_file=tmp_path / "nats.log").start()
    yield server
    server.stop()


@pytest.fixture(autouse=True, scope="session")
def _tracing():
    """A real tracer provider, so trace context is created and propagated in tests."""
    from lmforge.telemetry import setup_telemetry

    setup_telemetry("tests")
    yield


TINY_MODEL = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=160, seq_len=64,
                  micro_batch=8, learning_rate=3e-3, warmup_steps=2)


def tiny_train_config(*, max_steps: int, checkpoint_interval: int = 100, precision="fp32",
                      engine="plain", zero_stage=0, grad_accum=1, world_size=1, seed=1234,
                      gradient_checkpointing=False):
    """The tiny test model as a TrainConfig."""
    from services.trainer.config import (
        BatchConfig,
        CheckpointConfig,
        EngineConfig,
        ModelSpec,
        OptimizerConfig,
        ScheduleConfig,
        TrainConfig,
    )

    t = TINY_MODEL
    return TrainConfig(
        model=ModelSpec(hidden_size=t["hidden_size"], num_layers=t["num_layers"],
                        num_heads=t["num_heads"], intermediate_size=t["intermediate_size"]),
        batch=BatchConfig(seq_len=t["seq_len"], micro_batch=t["micro_batch"],
                          grad_accum=grad_accum),
        optimizer=OptimizerConfig(learning_rate=t["learning_rate"]),
        schedule=ScheduleConfig(max_steps=max_steps, warmup_steps=t["warmup_steps"]),
        checkpoint=CheckpointConfig(interval=checkpoint_interval),
        engine=EngineConfig(kind=engine, precision=precision, zero_stage=zero_stage,
                            gradient_checkpointing=gradient_checkpointing),
        seed=seed, world_size=world_size)


@pytest.fixture(scope="session")
def artifact_store(tmp_path_factory):
    from lmforge.artifacts import ArtifactStore

    return ArtifactStore(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="session")
def prepared_dataset(tmp_path_factory, artifact_store):
    """The shipped fortunes sample, prepared by data-prep's own code (vocab 1024)."""
    from services.data_prep.prepare import PrepConfig, prepare_dataset

    work = tmp_path_factory.mktemp("dataset")
    prepare_dataset(TEST_DATA / "fortunes-sample.txt", "text", "", work / "ds",
                    PrepConfig(vocab_size=1024, seq_len=TINY_MODEL["seq_len"]))
    return artifact_store.put_dir(work / "ds")


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, artifact_store, prepared_dataset):
    """A real tiny Llama trained for a few steps, stored as a Hugging Face directory."""
    from services.trainer.checkpoints import CheckpointIndex
    from services.trainer.training import Trainer

    config = tiny_train_config(max_steps=30)
    index = CheckpointIndex(tmp_path_factory.mktemp("ckpt"), "fixture", artifact_store)
    result = Trainer(config, prepared_dataset.path, artifact_store, index).run()
    return artifact_store.put_dir(result.model_dir, move=True)
