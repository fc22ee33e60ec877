"""`lmforge up --nats-cluster 3`: three routed nats-servers, every stream and bucket at
three replicas; a kill -9 of the event stream's leader mid-run is ridden out (the
services' publishes wait out the election) and the run is deployed with every stage's
output once and no acknowledged event missing. The publish gap and the run's time
are printed for the record (pytest -s)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.chaos import NATS_LEADER, ChaosConfig, run_session

pytestmark = [pytest.mark.e2e, pytest.mark.processes]


def test_an_even_or_single_node_cluster_is_refused_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "lmforge.cli.main", "up", "--nats-cluster",
                           "2"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LMFORGE_HOME": str(tmp_path)})
    assert done.returncode == 2
    assert "odd number of nodes, at least 3" in done.stderr


def test_a_run_rides_out_a_kill_of_the_stream_leader(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    config = ChaosConfig(runs=1, seed=7, first_targets=(NATS_LEADER,), warmup=False,
                         kill_window_s=(8.0, 14.0), records_per_run=80, run_timeout_s=240,
                         nats_cluster=3, env={"LMFORGE_SCHEDULER_TIME_BUDGET_S": "2"})
    result = asyncio.run(run_session(config, tmp_path))
    (run,) = result["per_run"]
    replicas = result["replicas"]
    assert replicas == [3, 3, 3], replicas
    assert run["killed_node"].startswith("lmforge-n"), run
    assert result["nats_server_kills"] == 1 and run["killed_mid_run"], run
    assert run["outcome"] == "deployed" and not run["problems"], run
    assert result["events_lost"] == 0, result["lost_ids"]
    assert result["stages_done_twice"] == 0 and result["stage_outputs_not_once"] == 0, run
    assert run["probe_publishes"] > 10 and run["publish_gap_s"] is not None
    with capsys.disabled():
        print(f"\nstream leader {run['killed_node']} killed {run['kill_after_s']}s into the "
              f"run: publish gap {run['publish_gap_s']}s, cluster back {run['recover_s']}s, "
              f"run deployed in {run['duration_s']}s, 0 lost")
