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
