"""The cost ledger prices every stage on the hardware it ran on, every attempt of a
preempted run included, with spot savings against on-demand."""

from __future__ import annotations

import asyncio
import json

import pytest

from lmforge.contracts.names import Bucket, Header
from lmforge.contracts.v1 import events_pb2 as ev
from services.cost_autoscaler.handlers import AutoscalerService
from tests.buses import MemoryHarness

T0 = 1_700_000_000 * 10**9


async def _ledger_entry(harness, run_id: str, *, charges: int = 1) -> dict:
    for _ in range(200):
        raw = await harness.kv_get(Bucket.COST_LEDGER, run_id)
        if raw is not None and len(json.loads(raw)["charges"]) >= charges:
            return json.loads(raw)
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no ledger entry for {run_id} with {charges} charge(s)")


def _timed(seconds: float, start_ns: int = T0) -> dict[str, str]:
    """The headers a handler that worked `seconds` puts on its output."""
    return {Header.WORK_STARTED_NS: str(start_ns),
            Header.PUBLISHED_NS: str(start_ns + int(seconds * 1e9))}


def test_ledger_uses_the_runs_device_and_ranks(harness, tmp_path):
    async def scenario():
        async with harness.service(AutoscalerService, home=tmp_path,
                                   autoscaler_price_per_hour={"cpu": 0.1, "cuda": 2.5}):
            await harness.publish(ev.ModelTrained(
                run_id="gpu-run", model_name="m", wall_seconds=1800, device="cuda",
                world_size=2), "gpu-run:trained")
            return await _ledger_entry(harness, "gpu-run")

    entry = asyncio.run(scenario())
    (charge,) = entry["charges"].values()
    assert (charge["hardware"], charge["count"], charge["stage"]) == ("cuda", 2, "trainer")
    assert entry["total_usd"] == pytest.approx(2 * 0.5 * 2.5)
    assert "no training.scheduled seen" in charge["note"]


def test_a_model_reused_from_the_stage_cache_costs_nothing(tmp_path):
    harness = MemoryHarness()

    async def scenario():
        async with harness.service(AutoscalerService, home=tmp_path):
            await harness.broker.publish(
                ev.ModelTrained(run_id="again", model_name="m", wall_seconds=1800, device="cpu"),
                msg_id="again:trained", headers={Header.CACHED_FROM: "first"})
            return await _ledger_entry(harness, "again")

    entry = asyncio.run(scenario())
    (charge,) = entry["charges"].values()
    assert entry["total_usd"] == 0 and charge["reused_from"] == "first"


def test_totals_include_the_preempted_attempt_and_the_spot_savings(tmp_path):
    harness = MemoryHarness()
    plan = ev.ResourcePlan(device="cuda", world_size=2, instance_type="gpu-x2", market="spot",
                           price_usd_per_hour=2.0)

    async def scenario():
        async with harness.service(AutoscalerService, home=tmp_path,
                                   autoscaler_price_per_hour={"cpu": 0.1, "gpu-x2": 3.0}):
            publish = harness.broker.publish
            await publish(ev.DatasetPrepared(run_id="r", model_name="m"), msg_id="r:prepared",
                          headers=_timed(360))
            first = ev.TrainingScheduled(run_id="r", model_name="m", plan=plan, attempt=0)
            await publish(first, msg_id="r:scheduled:0", headers=_timed(1))
            await _ledger_entry(harness, "r", charges=2)
            # An hour on spot, then the notice: the attempt checkpointed and handed back.
            await publish(ev.TrainingPreempted(run_id="r", step=50, reason="spot notice",
                                               scheduled=first),
                          msg_id="r:preempted:0", headers=_timed(3600))
            await publish(ev.TrainingScheduled(run_id="r", model_name="m", plan=plan, attempt=1),
                          msg_id="r:scheduled:1", headers=_timed(1))
            await _ledger_entry(harness, "r", charges=4)
            await publish(ev.ModelTrained(run_id="r", model_name="m", wall_seconds=1800,
                                          device="cuda", world_size=2),
                          msg_id="r:trained", headers=_timed(1900))
            # A redelivered event replaces its charge, never adds one.
            await publish(ev.ModelTrained(run_id="r", model_name="m", wall_seconds=1800,
                                          device="cuda", world_size=2),
                          msg_id="r:trained", headers=_timed(1900))
            return await _ledger_entry(harness, "r", charges=5)

    entry = asyncio.run(scenario())
    training = sorted((c for c in entry["charges"].values() if c["stage"] == "trainer"),
                      key=lambda c: c["attempt"])
    assert [c["attempt"] for c in training] == [0, 1]
    assert training[0]["note"].startswith("preempted at step 50")
    assert [c["cost_usd"] for c in training] == pytest.approx([2.0, 1.0])  # 1 h, 0.5 h at $2/h
    assert {c["market"] for c in training} == {"spot"}
    assert entry["training_attempts"] == 2 and entry["preempted_attempts"] == 1
    data_prep = entry["by_stage"]["data-prep"]
    assert data_prep == pytest.approx(0.1 * 360 / 3600)
    scheduler = entry["by_stage"]["scheduler"]
    assert entry["total_usd"] == pytest.approx(3.0 + data_prep + scheduler)
    # On demand the 1.5 GPU-pair hours would have cost $3/h per device.
    assert entry["spot_savings_usd"] == pytest.approx(1.5 * 3.0 * 2 - 3.0)


def test_a_stage_on_unpriced_hardware_is_charged_nothing_and_says_so(tmp_path):
    harness = MemoryHarness()

    async def scenario():
        async with harness.service(AutoscalerService, home=tmp_path,
                                   autoscaler_stage_hardware={"quantizer": "tpu"}):
            await harness.broker.publish(ev.ModelQuantized(run_id="q", model_name="m"),
                                         msg_id="q:quantized", headers=_timed(60))
            return await _ledger_entry(harness, "q")

    entry = asyncio.run(scenario())
    (charge,) = entry["charges"].values()
    assert charge["cost_usd"] == 0 and "NOT PRICED: no price for 'tpu'" in charge["note"]
    assert entry["spot_savings_usd"] is None  # not claimed as 0


def test_a_spot_attempt_without_a_plan_price_is_priced_from_the_catalog(tmp_path):
    from lmforge.catalog import load_catalog

    gpu = next(t for t in load_catalog().types.values() if t.spot_usd_per_hour)
    harness = MemoryHarness()
    plan = ev.ResourcePlan(device="cuda", world_size=2, instance_type=gpu.name, market="spot")

    async def scenario():
        async with harness.service(AutoscalerService, home=tmp_path):
            await harness.broker.publish(
                ev.TrainingPreempted(run_id="c", step=3, scheduled=ev.TrainingScheduled(
                    run_id="c", plan=plan)), msg_id="c:preempted", headers=_timed(3600))
            return await _ledger_entry(harness, "c")

    (charge,) = asyncio.run(scenario())["charges"].values()
    assert charge["cost_usd"] == pytest.approx(2 * gpu.spot_usd_per_hour)
    assert charge["on_demand_cost_usd"] == pytest.approx(2 * gpu.on_demand_usd_per_hour)


def test_a_ledger_entry_never_changes_tenant(tmp_path, caplog):
    """A run's entry is its first tenant's: a charge of another tenant under the same run
    id is refused and logged (the entry would hand globex's history to acme); a charge
    naming no tenant is the entry's, as before."""
    harness = MemoryHarness()

    def prepared(tenant: str, msg_id: str) -> tuple[ev.DatasetPrepared, str, dict[str, str]]:
        headers = _timed(3600)
        if tenant:
            headers[Header.TENANT] = tenant
        model_name = "acme-model" if tenant == "acme" else "globex-model"
        return (ev.DatasetPrepared(run_id="g1", model_name=model_name, vocab_size=len(msg_id)),
                msg_id, headers)

    async def scenario():
        async with harness.service(AutoscalerService, home=tmp_path,
                                   autoscaler_price_per_hour={"cpu": 1.0}):
            for event, msg_id, headers in (prepared("globex", "g1:prepared"),
                                           prepared("acme", "acme:g1:prepared"),
                                           prepared("", "g1:prepared-again")):
                await harness.broker.publish(event, msg_id=msg_id, headers=headers)
                await harness.broker.settled()
            return await _ledger_entry(harness, "g1", charges=2)

    entry = asyncio.run(scenario())
    assert entry["tenant"] == "globex" and entry["model_name"] == "globex-model"
    assert len(entry["charges"]) == 2 and entry["total_usd"] == pytest.approx(2.0)
    assert not any("acme" in key for key in entry["charges"])
    assert ("data-prep charge of run g1 refused: its ledger entry belongs to tenant "
            "'globex' and the event to tenant 'acme'") in caplog.text
