"""The reduced chaos suite (benchmarks/chaos.py, two runs): a kill -9 of the nats-server
mid-run, then of a service chosen by the seed, and every run still reaches
model.deployed with each stage's output exactly once, its stage records and
artifacts in place, and no acknowledged event missing from the stream.

The full session (20 runs, every target) is `python -m benchmarks.chaos`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from benchmarks.chaos import NATS_TARGET, ChaosConfig, plan_targets, run_session

pytestmark = [pytest.mark.e2e, pytest.mark.processes]


def test_runs_survive_a_nats_server_kill_and_a_service_kill(tmp_path: Path) -> None:
    config = ChaosConfig(runs=2, seed=5, first_targets=(NATS_TARGET,), warmup=False,
                         kill_window_s=(6.0, 20.0), records_per_run=80, run_timeout_s=240,
                         env={"LMFORGE_SCHEDULER_TIME_BUDGET_S": "2"})
    targets = plan_targets(config)
    assert targets[0] == NATS_TARGET and targets[1] != NATS_TARGET

    result = asyncio.run(run_session(config, tmp_path))

    runs = result["per_run"]
    assert [r["target"] for r in runs] == targets
    assert result["faults_injected"] == 2, runs
    assert result["nats_server_kills"] == 1
    assert result["runs_deployed"] == 2, runs
    assert result["events_lost"] == 0, result["lost_ids"]
    assert result["stages_done_twice"] == 0, runs
    assert result["stage_outputs_not_once"] == 0, runs
    assert result["missing_stage_records"] == 0 and result["missing_artifacts"] == 0, runs
    assert all(not r["problems"] for r in runs), runs
    assert result["recover_s_max"] < 60, runs
