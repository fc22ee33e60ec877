"""The cost ledger prices a run on the device and rank count it actually trained on."""

from __future__ import annotations

import asyncio
import json

import pytest

from lmforge.bus import EventBus, ensure_kv
from lmforge.contracts.v1 import events_pb2 as ev
from services.cost_autoscaler.handlers import LEDGER_BUCKET, AutoscalerService
from tests.helpers import in_process_service, publish

pytestmark = pytest.mark.connected


def test_ledger_uses_the_runs_device_and_ranks(nats_server, tmp_path):
    async def scenario():
        async with in_process_service(AutoscalerService, nats_server.url, home=tmp_path,
                                      autoscaler_price_per_hour={"cpu": 0.1, "cuda": 2.5}):
            await publish(nats_server.url, ev.ModelTrained(
                run_id="gpu-run", model_name="m", wall_seconds=1800, device="cuda",
                world_size=2), msg_id="gpu-run:trained")
            bus = EventBus("reader")
            await bus.connect(nats_server.url)
            ledger = await ensure_kv(bus.js, LEDGER_BUCKET)
            for _ in range(100):
                try:
                    entry = json.loads((await ledger.get("gpu-run")).value)
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            await bus.close()
            return entry

    entry = asyncio.run(scenario())
    assert entry["device"] == "cuda" and entry["devices"] == 2
    assert entry["train_cost"] == pytest.approx(2 * 0.5 * 2.5)
