"""Shared fixtures: a real nats-server per test (random ports, its own store)."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import pytest

from lmforge.runtime.nats_server import NatsServer
from services.trainer.config import PRESETS, TrainConfig
from tests.base_model_fixtures import base_models  # noqa: F401 - fixture
from tests.s3_server import s3, s3_endpoint  # noqa: F401 - fixtures for every test

# Two busy cores make OpenMP spin; every test process and child stays passive.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = REPO_ROOT / "tests" / "data"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts a nats-server is `connected`, marked or not, so `make unit` skips it."""
    for item in items:
        if "nats_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.connected)


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


TINY_PRESET = "test-tiny"
"""The tiny test model, a preset of the shared table (libs/lmforge/presets.py)."""

TINY_MODEL: dict[str, object] = asdict(PRESETS[TINY_PRESET])
"""The tiny model's shape and batch by name (hidden_size, seq_len, micro_batch, ...)."""


def tiny_train_config(*, max_steps: int, checkpoint_interval: int = 100,
                      precision: str = "fp32", engine: str = "plain", zero_stage: int = 0,
                      grad_accum: int = 1, world_size: int = 1, seed: int = 1234,
                      gradient_checkpointing: bool = False) -> TrainConfig:
    """The tiny test model as a TrainConfig (`TrainConfig.from_preset("test-tiny", ...)`)."""
    return TrainConfig.from_preset(
        TINY_PRESET, max_steps=max_steps, checkpoint_interval=checkpoint_interval,
        precision=precision, engine_kind=engine, zero_stage=zero_stage, grad_accum=grad_accum,
        world_size=world_size, seed=seed, gradient_checkpointing=gradient_checkpointing)


@pytest.fixture(scope="session")
def artifact_store(tmp_path_factory):
    from lmforge.artifacts import ArtifactStore

    return ArtifactStore(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="session")
def prepared_dataset(tmp_path_factory, artifact_store):
    """The shipped fortunes sample, prepared by data-prep's own code (vocab 1024; hygiene
    only, so the fixture model is the one the gateway tests were calibrated on)."""
    from services.data_prep.prepare import PrepConfig, prepare_dataset

    work = tmp_path_factory.mktemp("dataset")
    prepare_dataset(TEST_DATA / "fortunes-sample.txt", "text", "", work / "ds",
                    PrepConfig.hygiene_only(vocab_size=1024, seq_len=TINY_MODEL["seq_len"]))
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


@pytest.fixture(params=["memory", pytest.param("nats", marks=pytest.mark.connected)])
def harness(request, tmp_path: Path):
    """A handler-test harness on the in-memory bus and, marked `connected`, on NATS."""
    from tests.buses import MemoryHarness, NatsHarness

    if request.param == "memory":
        return MemoryHarness()
    return NatsHarness(request.getfixturevalue("nats_server").url)
