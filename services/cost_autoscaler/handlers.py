"""cost-autoscaler's wiring: a control loop publishing scaling.decided, and a cost
ledger fed by model.trained.

SRE pins (`lmforge scale trainer=2`) live in the `lmforge_scale_pins`
key-value bucket and always win. A decision is published when it changes;
the supervisor (or, on Kubernetes, the operator acting on Deployments)
applies it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Annotated

import nats.js.errors
from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from lmforge.bus import Delivery, ensure_kv
from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.service import Service
from lmforge.settings import ServiceSettings
from services.cost_autoscaler.observing import RequestRate, consumer_backlogs
from services.cost_autoscaler.policy import (
    SERVICES,
    PolicyConfig,
    ReactivePolicy,
    ServiceLoad,
    training_cost,
)

log = logging.getLogger("lmforge.autoscaler")
PINS_BUCKET = "lmforge_scale_pins"
LEDGER_BUCKET = "lmforge_cost_ledger"


class AutoscalerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", frozen=True)

    autoscaler_interval_s: float = Field(5.0, gt=0, description="Seconds between decisions.")
    autoscaler_min_replicas: int = Field(1, ge=0)
    autoscaler_max_replicas: int = Field(2, ge=1)
    autoscaler_backlog_per_replica: int = Field(4, ge=1)
    autoscaler_rps_per_replica: float = Field(20.0, gt=0)
    autoscaler_gateway_metrics: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Gateway /metrics URLs, comma separated."
    )
    autoscaler_price_per_hour: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=lambda: {"cpu": 0.10, "cuda": 2.50},
        description="Pool prices, e.g. 'cpu=0.10,cuda=2.50'.",
    )

    @field_validator("autoscaler_gateway_metrics", mode="before")
    @classmethod
    def _parse_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("autoscaler_price_per_hour", mode="before")
    @classmethod
    def _parse_prices(cls, value: object) -> object:
        if isinstance(value, str):
            prices = {}
            for item in filter(None, (v.strip() for v in value.split(","))):
                device, sep, price = item.partition("=")
                if not sep:
                    raise ValueError(f"price {item!r} is not device=price")
                prices[device.strip()] = float(price)
            return prices
        return value

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalerSettings:
        if self.autoscaler_min_replicas > self.autoscaler_max_replicas:
            raise ValueError("min_replicas exceeds max_replicas")
        return self


async def read_pins(kv) -> dict[str, int]:
    pins: dict[str, int] = {}
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return pins
    for key in keys:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError, ValueError):
            pins[key] = int((await kv.get(key)).value.decode())
    return pins


class AutoscalerService(Service):
    name = "cost-autoscaler"
    Settings = AutoscalerSettings

    def register(self) -> None:
        s: AutoscalerSettings = self.settings  # type: ignore[assignment]

        @self.bus.subscriber(subjects.MODEL_TRAINED)
        async def on_trained(event: ev.ModelTrained, delivery: Delivery) -> None:
            device = event.device or "cpu"
            devices = max(1, event.world_size)
            cost = devices * training_cost(event.wall_seconds, device,
                                           s.autoscaler_price_per_hour)
            ledger = await ensure_kv(self.bus.js, LEDGER_BUCKET)
            entry = {"run_id": event.run_id, "model_name": event.model_name, "device": device,
                     "devices": devices,
                     "train_wall_seconds": event.wall_seconds, "train_cost": round(cost, 6),
                     "price_per_hour": s.autoscaler_price_per_hour.get(device, 0.0)}
            await ledger.put(event.run_id, json.dumps(entry).encode())
            log.info("run cost %.4f for %.0fs of %s", cost, event.wall_seconds, device,
                     extra={"run_id": event.run_id})

    async def serve(self, stop: asyncio.Event) -> None:
        s: AutoscalerSettings = self.settings  # type: ignore[assignment]
        policy = ReactivePolicy(PolicyConfig(
            min_replicas=s.autoscaler_min_replicas, max_replicas=s.autoscaler_max_replicas,
            backlog_per_replica=s.autoscaler_backlog_per_replica,
            rps_per_replica=s.autoscaler_rps_per_replica))
        rate = RequestRate(s.autoscaler_gateway_metrics)
        pins_kv = await ensure_kv(self.bus.js, PINS_BUCKET)
        current: dict[str, int] = {name: s.autoscaler_min_replicas or 1 for name in SERVICES}
        last_published: list | None = None
        sequence = 0
        while not stop.is_set():
            try:
                backlog = await consumer_backlogs(self.bus.js)
                rps = await rate.sample()
                loads = {name: ServiceLoad(name, backlog.get(name, 0),
                                           rps if name == "inference-gateway" else 0.0)
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
            except Exception as exc:  # observing failed this round: try again next round
                log.warning("scaling round failed: %s", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=s.autoscaler_interval_s)
