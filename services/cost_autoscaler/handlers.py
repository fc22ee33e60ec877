"""cost-autoscaler's wiring: a control loop publishing scaling.decided, and a cost
ledger fed by model.trained.

SRE pins (`lmforge scale trainer=2`) live in the `lmforge_scale_pins`
key-value bucket and always win. A decision is published when it changes;
an `Actuator` (actuators.py) applies it: the `lmforge up` supervisor, or the
Kubernetes API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from lmforge.bus import EventBus
from lmforge.contracts import subjects
from lmforge.contracts.names import SERVICES, Bucket, ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import Delivery, KeyValue, subscriber
from lmforge.service import Service
from services.cost_autoscaler.actuators import build_actuator
from services.cost_autoscaler.observing import RequestRate, consumer_backlogs
from services.cost_autoscaler.policy import (
    PolicyConfig,
    ReactivePolicy,
    ServiceLoad,
    training_cost,
)
from services.cost_autoscaler.settings import AutoscalerSettings

log = logging.getLogger("lmforge.autoscaler")


async def read_pins(kv: KeyValue) -> dict[str, int]:
    """Replica counts pinned by `lmforge scale`; an unreadable pin is ignored."""
    pins: dict[str, int] = {}
    for key in await kv.keys():
        value = await kv.get(key)
        with contextlib.suppress(ValueError):
            if value is not None:
                pins[key] = int(value.decode())
    return pins


class AutoscalerService(Service[AutoscalerSettings]):
    name = ServiceName.COST_AUTOSCALER
    Settings = AutoscalerSettings

    @subscriber(subjects.MODEL_TRAINED)
    async def on_trained(self, event: ev.ModelTrained, delivery: Delivery) -> None:
        """Price the run's training; a model reused from the stage cache cost nothing."""
        s = self.settings
        device = event.device or "cpu"
        devices = max(1, event.world_size)
        reused_from = delivery.cached_from
        cost = 0.0 if reused_from else devices * training_cost(
            event.wall_seconds, device, s.autoscaler_price_per_hour)
        entry = {"run_id": event.run_id, "model_name": event.model_name, "device": device,
                 "devices": devices,
                 "train_wall_seconds": 0.0 if reused_from else event.wall_seconds,
                 "train_cost": round(cost, 6), "reused_from": reused_from,
                 "price_per_hour": s.autoscaler_price_per_hour.get(device, 0.0)}
        await self.bus.key_value(Bucket.COST_LEDGER).put(event.run_id, json.dumps(entry).encode())
        log.info("run cost %.4f for %.0fs of %s%s", cost, entry["train_wall_seconds"], device,
                 f" (model reused from run {reused_from})" if reused_from else "")

    async def serve(self, stop: asyncio.Event) -> None:
        s = self.settings
        if not isinstance(self.bus, EventBus):
            raise TypeError("the scaling loop reads JetStream consumer state: it needs the "
                            "NATS EventBus")
        policy = ReactivePolicy(PolicyConfig(
            min_replicas=s.autoscaler_min_replicas, max_replicas=s.autoscaler_max_replicas,
            backlog_per_replica=s.autoscaler_backlog_per_replica,
            trainer_jobs_per_replica=s.autoscaler_trainer_jobs_per_replica,
            rps_per_replica=s.autoscaler_rps_per_replica))
        try:
            actuator = build_actuator(s)
        except (RuntimeError, ValueError) as exc:
            log.error("%s", exc)
            raise SystemExit(2) from None
        rate = RequestRate(s.autoscaler_gateway_metrics)
        pins_kv = self.bus.key_value(Bucket.SCALE_PINS)
        current: dict[str, int] = {name: s.autoscaler_min_replicas or 1 for name in SERVICES}
        last_published: list | None = None
        sequence = 0
        while not stop.is_set():
            try:
                backlog = await consumer_backlogs(self.bus.js)
                rps = await rate.sample()
                loads: dict[str, ServiceLoad] = {
                    name: ServiceLoad(name, backlog.get(name, 0),
                                      rps if name == ServiceName.INFERENCE_GATEWAY else 0.0)
                    for name in SERVICES}
                pins = await read_pins(pins_kv)
                decisions = policy.decide(loads, current, pins)
                key = [(d.service, d.replicas, d.pinned) for d in decisions]
                if key != last_published:
                    sequence += 1
                    now_ms = int(time.time() * 1000)
                    event = ev.ScalingDecided(
                        run_id=f"scaling-{now_ms}", decided_at_unix_ms=now_ms,
                        services=[ev.ServiceScale(service=d.service, replicas=d.replicas,
                                                  reason=d.reason, pinned=d.pinned,
                                                  load=d.load) for d in decisions])
                    await self.bus.publish(event, msg_id=f"scaling-{now_ms}-{sequence}")
                    last_published = key
                    current = {d.service: d.replicas for d in decisions}
                # Every round, not only on a change: someone may have scaled by hand.
                await actuator.apply(decisions)
            except Exception as exc:  # observing failed this round: try again next round
                log.warning("scaling round failed: %s", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=s.autoscaler_interval_s)
