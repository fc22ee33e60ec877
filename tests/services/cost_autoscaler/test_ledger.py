"""The cost ledger prices a run on the device and rank count it actually trained on."""

from __future__ import annotations

import asyncio
import json

import pytest

from lmforge.contracts.names import Bucket, Header
from lmforge.contracts.v1 import events_pb2 as ev
from services.cost_autoscaler.handlers import AutoscalerService


async def _ledger_entry(harness, run_id: str) -> dict:
    for _ in range(200):
        raw = await harness.kv_get(Bucket.COST_LEDGER, run_id)
        if raw is not None:
            return json.loads(raw)
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no ledger entry for {run_id}")


def test_ledger_uses_the_runs_device_and_ranks(harness, tmp_path):
    async def scenario():
        async with harness.service(AutoscalerService, home=tmp_path,
                                   autoscaler_price_per_hour={"cpu": 0.1, "cuda": 2.5}):
            await harness.publish(ev.ModelTrained(
                run_id="gpu-run", model_name="m", wall_seconds=1800, device="cuda",
                world_size=2), "gpu-run:trained")
            return await _ledger_entry(harness, "gpu-run")

    entry = asyncio.run(scenario())
    assert entry["device"] == "cuda" and entry["devices"] == 2
    assert entry["train_cost"] == pytest.approx(2 * 0.5 * 2.5)


def test_a_model_reused_from_the_stage_cache_costs_nothing(tmp_path):
    from tests.buses import MemoryHarness

    harness = MemoryHarness()

    async def scenario():
        async with harness.service(AutoscalerService, home=tmp_path):
            await harness.broker.publish(
                ev.ModelTrained(run_id="again", model_name="m", wall_seconds=1800, device="cpu"),
                msg_id="again:trained", headers={Header.CACHED_FROM: "first"})
            return await _ledger_entry(harness, "again")

    entry = asyncio.run(scenario())
    assert entry["train_cost"] == 0 and entry["reused_from"] == "first"
