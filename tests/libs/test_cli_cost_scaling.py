"""`lmforge cost --json` reads back what the autoscaler priced; `lmforge scaling replay
--json` replays a trace through the autoscaler's policies and reports each one."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from lmforge.cli.main import main as lmforge_main
from lmforge.contracts.names import Bucket, Header
from lmforge.contracts.v1 import events_pb2 as ev
from services.cost_autoscaler.handlers import AutoscalerService
from tests.buses import NatsHarness


@pytest.mark.connected
def test_cost_json_reads_the_ledger_with_a_preempted_attempt(nats_server, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LMFORGE_NATS_URL", nats_server.url)
    harness = NatsHarness(nats_server.url)
    t0 = 1_700_000_000 * 10**9
    plan = ev.ResourcePlan(device="cuda", world_size=1, instance_type="gpu-1", market="spot",
                           price_usd_per_hour=1.0)
    scheduled = ev.TrainingScheduled(run_id="r1", model_name="m", plan=plan)

    async def scenario() -> None:
        client = await harness.client()
        async with harness.service(AutoscalerService, home=tmp_path,
                                   autoscaler_price_per_hour={"cpu": 0.1, "gpu-1": 4.0}):
            await client.publish(scheduled, msg_id="r1:s0", headers={
                Header.WORK_STARTED_NS: str(t0), Header.PUBLISHED_NS: str(t0)})
            await client.publish(ev.TrainingPreempted(run_id="r1", step=7, scheduled=scheduled),
                                 msg_id="r1:p0", headers={
                                     Header.WORK_STARTED_NS: str(t0),
                                     Header.PUBLISHED_NS: str(t0 + 1800 * 10**9)})
            for _ in range(200):
                raw = await harness.kv_get(Bucket.COST_LEDGER, "r1")
                if raw and len(json.loads(raw)["charges"]) == 2:
                    return
                await asyncio.sleep(0.05)
            raise TimeoutError("the ledger never priced both events")

    asyncio.run(scenario())
    capsys.readouterr()
    assert lmforge_main(["cost", "r1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    run = report["runs"]["r1"]
    assert run["total_usd"] == pytest.approx(0.5)  # half an hour of spot at $1/h
    assert run["spot_savings_usd"] == pytest.approx(2.0 - 0.5)
    assert run["preempted_attempts"] == 1
    assert lmforge_main(["cost", "nope", "--json"]) == 1


@pytest.mark.connected
def test_a_tenants_cost_shows_only_its_own_runs(nats_server, tmp_path):
    """The ledger entry keeps the run's tenant (from the event's tenant header, which only
    services can set past dataset.ready); the autoscaler answers a tenant's cost query with
    that tenant's entries only, and an open deployment's CLI reads every run."""
    import nats

    from lmforge.cli.cost import read_ledger
    from lmforge.cli.tenant_reads import tenant_costs

    harness = NatsHarness(nats_server.url)
    t0 = 1_700_000_000 * 10**9

    async def scenario() -> tuple[dict, dict, dict]:
        client = await harness.client()
        async with harness.service(AutoscalerService, home=tmp_path,
                                   autoscaler_price_per_hour={"cpu": 0.1}):
            for run_id, tenant in (("a1", "acme"), ("g1", "globex"), ("open1", "")):
                headers = {Header.WORK_STARTED_NS: str(t0), Header.PUBLISHED_NS: str(t0),
                           **({Header.TENANT: tenant} if tenant else {})}
                await client.publish(ev.ModelQuantized(run_id=run_id, model_name="m"),
                                     msg_id=f"{run_id}:q", headers=headers)
            for _ in range(200):
                if all([await harness.kv_get(Bucket.COST_LEDGER, r)
                        for r in ("a1", "g1", "open1")]):
                    break
                await asyncio.sleep(0.05)
            everyone, _ = await read_ledger(nats_server.url)
            nc = await nats.connect(nats_server.url)
            try:
                acme, _ = await tenant_costs(nc, "acme")
                globex, _ = await tenant_costs(nc, "globex")
            finally:
                await nc.close()
        return everyone, acme, globex

    everyone, acme, globex = asyncio.run(scenario())
    assert set(everyone) == {"a1", "g1", "open1"}  # an open deployment's CLI: every run
    assert set(acme) == {"a1"} and acme["a1"]["tenant"] == "acme"
    assert set(globex) == {"g1"}


def _write_trace(path: Path, days: int) -> None:
    """A daily cycle: 10 req/s at night, 100 at noon, one row a minute."""
    rows = ["minute,requests_per_s"]
    for minute in range(days * 1440):
        hour = (minute % 1440) / 60
        rows.append(f"{minute},{10 + 90 * max(0.0, math.sin(math.pi * (hour - 6) / 12)):.2f}")
    path.write_text("\n".join(rows) + "\n")


@pytest.mark.processes
def test_scaling_replay_json_reports_every_policy(tmp_path, capfd):
    trace = tmp_path / "trace.csv"
    _write_trace(trace, days=3)
    code = lmforge_main(["scaling", "replay", str(trace), "--train-days", "2",
                         "--max-replicas", "20", "--rps-per-replica", "10", "--json"])
    out = capfd.readouterr().out
    assert code == 0, out
    report = json.loads(out)
    policies = report["policies"]
    assert set(policies) == {"static", "reactive", "predictive"}
    assert all(p["scored_minutes"] == 1440 for p in policies.values())
    static, reactive, predictive = (policies[k] for k in ("static", "reactive", "predictive"))
    assert static["peak_replicas"] == 10 and static["slo_violation_minutes"] == 0
    assert static["replica_hours"] == pytest.approx(240)
    # The reactive rule lags every rise by a cold start; the forecast sees the rise coming.
    assert reactive["slo_violation_minutes"] > 0
    assert predictive["slo_violation_minutes"] < reactive["slo_violation_minutes"]
    assert predictive["forecast_fits"] >= 1 and "daily only" in predictive["forecast_note"]
    assert reactive["replica_hours"] < static["replica_hours"]


def test_scaling_replay_refuses_a_trace_with_a_gap(tmp_path, capsys):
    from services.cost_autoscaler.replay import main as replay_main

    trace = tmp_path / "gap.csv"
    trace.write_text("minute,requests_per_s\n0,1\n2,1\n")
    assert replay_main([str(trace), "--json"]) == 2
    assert "minute 2, expected 1" in capsys.readouterr().err
