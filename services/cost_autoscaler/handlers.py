"""cost-autoscaler's wiring: a control loop publishing scaling.decided, a cost
ledger fed by the event that closes each stage, and the answers to tenants' queries
for their own runs and costs (tenant_queries.py).

SRE pins (`lmforge scale trainer=2`) live in the `lmforge_scale_pins`
key-value bucket and always win. A decision is published when it changes;
an `Actuator` (actuators.py) applies it: the `lmforge up` supervisor, or the
Kubernetes API. The gateway's load history lives in `lmforge_load_history`, so a
restarted autoscaler forecasts from the days it had seen; the forecast is
refitted on a schedule, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from google.protobuf.message import Message

from lmforge.bus import EventBus
from lmforge.catalog import load_catalog
from lmforge.contracts import subjects
from lmforge.contracts.names import SERVICES, Bucket, Header, ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import Delivery, KeyValue, subscriber
from lmforge.service import Bus, Service
from services.cost_autoscaler.actuators import Actuator, build_actuator
from services.cost_autoscaler.gateway_forecast import GatewayForecaster
from services.cost_autoscaler.history import LoadHistory, LoadHistoryStore
from services.cost_autoscaler.ledger import (
    SERVING_KEY,
    PlannedHardware,
    RunLedger,
    ServingLedger,
    price_stage,
)
from services.cost_autoscaler.metrics import record_charge, record_scaling
from services.cost_autoscaler.observing import GatewayMetrics, GatewayReading, consumer_backlogs
from services.cost_autoscaler.policy import (
    Decision,
    PredictivePolicy,
    ReactivePolicy,
    ServiceLoad,
)
from services.cost_autoscaler.pricing import (
    ON_DEMAND,
    HourlyPrice,
    UnknownHardwareError,
    price_book,
)
from services.cost_autoscaler.settings import AutoscalerSettings
from services.cost_autoscaler.tenant_queries import TenantQueries

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


def handler_seconds(delivery: Delivery) -> float | None:
    """The wall time the publishing handler spent, from the event's headers."""
    try:
        started = int(delivery.headers[Header.WORK_STARTED_NS])
        published = int(delivery.headers[Header.PUBLISHED_NS])
    except (KeyError, ValueError):
        return None
    return max(0.0, (published - started) / 1e9) if started else None


class AutoscalerService(Service[AutoscalerSettings]):
    name = ServiceName.COST_AUTOSCALER
    Settings = AutoscalerSettings

    def __init__(self, settings: AutoscalerSettings, bus: Bus) -> None:
        super().__init__(settings, bus)
        self.prices = price_book(load_catalog(settings.catalog),
                                 settings.autoscaler_price_per_hour,
                                 settings.autoscaler_spot_price_per_hour)
        self._ledger_lock = asyncio.Lock()
        self.queries: TenantQueries | None = None

    async def start(self) -> None:
        """Consume, and answer tenants' queries for their runs and costs on NATS (the
        in-memory test bus has no request/reply: nothing to answer there)."""
        await super().start()
        if isinstance(self.bus, EventBus) and self.bus.nc is not None:
            self.queries = TenantQueries(self.bus.nc, self.bus.js,
                                         self.bus.key_value(Bucket.COST_LEDGER))
            await self.queries.start()

    # -- the cost ledger -------------------------------------------------------------

    async def _charge(self, event: Message, delivery: Delivery, stage: str, *,
                      wall_seconds: float | None = None, attempt: int = 0,
                      plan: ev.ResourcePlan | None = None, device: str = "",
                      count: int = 0, note: str = "") -> None:
        """Add the charge of one stage to its run's ledger entry (read, change, write); a
        charge of another tenant than the entry's is refused (`RunLedger.foreign_tenant`)."""
        run_id = str(getattr(event, "run_id", ""))
        kv = self.bus.key_value(Bucket.COST_LEDGER)
        async with self._ledger_lock:
            raw = await kv.get(run_id)
            ledger = RunLedger.from_json(raw) if raw else RunLedger(run_id,
                                                                    tenant=delivery.tenant)
            if ledger.foreign_tenant(delivery.tenant):
                log.error("%s charge of run %s refused: its ledger entry belongs to tenant "
                          "%r and the event to tenant %r; the entry keeps its tenant and "
                          "this charge is not recorded", stage, run_id,
                          ledger.tenant or "(none)", delivery.tenant)
                return
            ledger.model_name = str(getattr(event, "model_name", "")) or ledger.model_name
            if isinstance(event, ev.TrainingScheduled):
                p = event.plan
                ledger.plans[event.attempt] = PlannedHardware(
                    hardware=p.instance_type or p.device or "cpu",
                    count=max(1, p.world_size), market=p.market or ON_DEMAND,
                    usd_per_hour_total=p.price_usd_per_hour)
            if wall_seconds is None:
                wall_seconds = handler_seconds(delivery)
            if wall_seconds is None:
                wall_seconds, note = 0.0, (note + "; " if note else "") + (
                    "not priced: the event carries no timing headers")
            try:
                hardware, count, market, price, how = self._hardware(stage, plan, device, count)
            except UnknownHardwareError as exc:
                # The run is not failed for a gap in the price list: charged nothing, and
                # the entry says so (`lmforge cost` shows it; savings are not claimed).
                hardware = device or (plan.instance_type or plan.device if plan is not None
                                      else self.settings.autoscaler_stage_hardware.get(stage,
                                                                                      "cpu"))
                market = ON_DEMAND
                count, price, how = max(1, count), HourlyPrice(0.0, None, "unpriced"), (
                    f"NOT PRICED: {exc}")
                log.warning("%s of run %s not priced: %s", stage, run_id, exc)
            charge = price_stage(stage=stage, attempt=attempt, hardware=hardware, count=count,
                                 market=market, wall_seconds=wall_seconds, price=price,
                                 reused_from=delivery.cached_from,
                                 note="; ".join(n for n in (note, how) if n))
            ledger.add(f"{stage}:{delivery.msg_id}", charge)
            await kv.put(run_id, ledger.to_json())
        record_charge(stage, charge.cost_usd)
        log.info("%s cost $%.4f: %.1fs x %d %s (%s) at $%.4f/h%s", stage, charge.cost_usd,
                 charge.wall_seconds, count, hardware, market, price.usd_per_hour,
                 f" (reused from run {charge.reused_from})" if charge.reused_from else "")

    def _hardware(self, stage: str, plan: ev.ResourcePlan | None, device: str, count: int
                  ) -> tuple[str, int, str, HourlyPrice, str]:
        """(hardware, count, market, price per device, how it was priced)."""
        s = self.settings
        if plan is not None:
            count = count or max(1, plan.world_size)
            market = plan.market or ON_DEMAND
            if plan.price_usd_per_hour > 0:
                hardware = plan.instance_type or device or plan.device
                on_demand = self.prices.on_demand_price(hardware)
                if market == ON_DEMAND:
                    on_demand = plan.price_usd_per_hour / count
                return hardware, count, market, HourlyPrice(
                    plan.price_usd_per_hour / count, on_demand, "the plan's price"), ""
            hardware = plan.instance_type or device or plan.device or "cpu"
            return hardware, count, market, self.prices.price(hardware, market=market), ""
        hardware = device or s.autoscaler_stage_hardware.get(stage, "cpu")
        how = "" if device else f"{stage} runs on {hardware} (LMFORGE_AUTOSCALER_STAGE_HARDWARE)"
        return hardware, max(1, count), ON_DEMAND, self.prices.price(hardware), how

    @subscriber(subjects.DATASET_PREPARED)
    async def on_prepared(self, event: ev.DatasetPrepared, delivery: Delivery) -> None:
        await self._charge(event, delivery, ServiceName.DATA_PREP)

    @subscriber(subjects.TRAINING_SCHEDULED)
    async def on_scheduled(self, event: ev.TrainingScheduled, delivery: Delivery) -> None:
        await self._charge(event, delivery, ServiceName.SCHEDULER, attempt=event.attempt)

    @subscriber(subjects.TRAINING_PREEMPTED)
    async def on_preempted(self, event: ev.TrainingPreempted, delivery: Delivery) -> None:
        """A preempted attempt was paid for too: its handler's wall time on its plan."""
        scheduled = event.scheduled
        await self._charge(event, delivery, ServiceName.TRAINER, attempt=scheduled.attempt,
                           plan=scheduled.plan,
                           note=f"preempted at step {event.step}: {event.reason}")

    @subscriber(subjects.MODEL_TRAINED)
    async def on_trained(self, event: ev.ModelTrained, delivery: Delivery) -> None:
        """The finished attempt, on the device and rank count it actually trained on."""
        raw = await self.bus.key_value(Bucket.COST_LEDGER).get(event.run_id)
        attempt, planned = RunLedger.from_json(raw).latest_plan() if raw else (0, None)
        plan = None
        if planned is not None and planned.usd_per_hour_total > 0:
            plan = ev.ResourcePlan(instance_type=planned.hardware, market=planned.market,
                                   price_usd_per_hour=planned.usd_per_hour_total,
                                   world_size=planned.count, device=event.device)
        await self._charge(event, delivery, ServiceName.TRAINER, attempt=attempt,
                           wall_seconds=event.wall_seconds or None, plan=plan,
                           device=event.device or "cpu", count=max(1, event.world_size),
                           note="" if planned else "no training.scheduled seen: priced by "
                           "the device it reported")

    @subscriber(subjects.MODEL_QUANTIZED)
    async def on_quantized(self, event: ev.ModelQuantized, delivery: Delivery) -> None:
        await self._charge(event, delivery, ServiceName.QUANTIZER)

    @subscriber(subjects.MODEL_EXPORTED)
    async def on_exported(self, event: ev.ModelExported, delivery: Delivery) -> None:
        await self._charge(event, delivery, ServiceName.EXPORTER)

    # -- the control loop ------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        s = self.settings
        if not isinstance(self.bus, EventBus):
            raise TypeError("the scaling loop reads JetStream consumer state: it needs the "
                            "NATS EventBus")
        try:
            actuator = build_actuator(s)
        except (RuntimeError, ValueError) as exc:
            log.error("%s", exc)
            raise SystemExit(2) from None
        loop = ScalingLoop(self, stop, actuator)
        try:
            await loop.start()
            await loop.run(s.autoscaler_interval_s)
        finally:  # before the bus closes: the answers in hand still go out
            if self.queries is not None:
                await self.queries.stop()


class ScalingLoop:
    """One round every interval: observe, record history, refit when due, decide, publish,
    and account serving."""

    def __init__(self, service: AutoscalerService, stop: asyncio.Event,
                 actuator: Actuator) -> None:
        s = service.settings
        self.service, self.stop, self.settings = service, stop, s
        self.actuator = actuator
        assert isinstance(service.bus, EventBus)
        self.bus: EventBus = service.bus
        self.policy = PredictivePolicy(ReactivePolicy(s.policy_config()))
        self.metrics = GatewayMetrics(s.autoscaler_gateway_metrics)
        self.forecaster = GatewayForecaster(
            s.forecast_config(), LoadHistory(keep_days=s.autoscaler_history_days))
        self.history_store = LoadHistoryStore(self.bus.key_value(Bucket.LOAD_HISTORY))
        self.current: dict[str, int] = {name: s.autoscaler_min_replicas or 1
                                        for name in SERVICES}
        self.serving = ServingLedger(s.autoscaler_gateway_hardware, service.prices.price(
            s.autoscaler_gateway_hardware).usd_per_hour)
        self._fit: asyncio.Task[bool] | None = None
        self._last_published: list[tuple[str, int, bool, str]] | None = None
        self._sequence = 0
        self._last_round: float | None = None

    async def start(self) -> None:
        loaded = await self.history_store.load(self.forecaster.history)
        raw = await self.bus.key_value(Bucket.COST_LEDGER).get(SERVING_KEY)
        if raw:
            self.serving = ServingLedger.from_json(raw, hardware=self.serving.hardware,
                                                   usd_per_hour=self.serving.usd_per_hour)
        log.info("load history: %d bucket(s) restored", loaded)

    async def run(self, interval_s: float) -> None:
        while not self.stop.is_set():
            try:
                await self.round(time.time())
            except Exception as exc:  # observing failed this round: try again next round
                log.warning("scaling round failed: %s", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=interval_s)
        if self._fit is not None:
            self._fit.cancel()

    async def round(self, now_s: float) -> list[Decision]:
        s = self.settings
        backlog = await consumer_backlogs(self.bus.js)
        reading = await self.metrics.sample()
        await self._account_serving(now_s, reading)
        forecast = None
        if reading.requests_per_second is not None:
            for bucket in self.forecaster.record(now_s, reading.requests_per_second,
                                                 reading.backlog or 0.0):
                await self.history_store.save(self.forecaster.history, bucket)
        else:
            log.warning("gateway load unknown: %s", reading.unknown_reason)
        if s.autoscaler_forecast:
            self._refit_in_background()
            forecast = self.forecaster.forecast(now_s)
        loads: dict[str, ServiceLoad] = {name: ServiceLoad(name, backlog.get(name, 0))
                                         for name in SERVICES}
        gateway = ServiceName.INFERENCE_GATEWAY
        loads[gateway] = ServiceLoad(gateway, backlog.get(gateway, 0),
                                     reading.requests_per_second, reading.unknown_reason)
        pins = await read_pins(self.bus.key_value(Bucket.SCALE_PINS))
        decisions = self.policy.decide(loads, self.current, pins, forecast, now_s=now_s)
        record_scaling(decisions, self.usd_per_replica_hour)
        await self._publish(decisions, forecast.lead_s if forecast else 0.0)
        # Every round, not only on a change: someone may have scaled by hand.
        await self.actuator.apply(decisions)
        return decisions

    def usd_per_replica_hour(self, service: str) -> float | None:
        """The price of one replica's hardware (the gateway's, or the stage's), or None
        when the price list has none."""
        s = self.settings
        hardware = (s.autoscaler_gateway_hardware if service == ServiceName.INFERENCE_GATEWAY
                    else s.autoscaler_stage_hardware.get(service, "cpu"))
        try:
            return self.service.prices.price(hardware).usd_per_hour
        except UnknownHardwareError:
            return None

    def _refit_in_background(self) -> None:
        """A fit takes seconds of CPU: run it in a thread, never twice at once."""
        if self._fit is not None and not self._fit.done():
            return
        if self._fit is not None and self._fit.done() and not self._fit.cancelled():
            if self._fit.exception() is not None:
                log.warning("forecast fit failed: %s", self._fit.exception())
            self._fit = None
        if self.forecaster.refit_due():
            self._fit = asyncio.create_task(asyncio.to_thread(self.forecaster.refit))
            self._fit.add_done_callback(
                lambda _: log.info("forecast: %s", self.forecaster.model.note))

    async def _account_serving(self, now_s: float, reading: GatewayReading) -> None:
        last, self._last_round = self._last_round, now_s
        if last is None or now_s <= last:
            return
        replicas = self.current.get(ServiceName.INFERENCE_GATEWAY, 0)
        known = reading.requests_per_second is not None
        self.serving.add(now_s - last, replicas, reading.tokens if known else None)
        await self.bus.key_value(Bucket.COST_LEDGER).put(SERVING_KEY, self.serving.to_json())

    async def _publish(self, decisions: list[Decision], lead_s: float) -> None:
        key = [(d.service, d.replicas, d.pinned, d.policy) for d in decisions]
        if key == self._last_published:
            return
        self._sequence += 1
        now_ms = int(time.time() * 1000)
        event = ev.ScalingDecided(
            run_id=f"scaling-{now_ms}", decided_at_unix_ms=now_ms,
            services=[ev.ServiceScale(service=d.service, replicas=d.replicas, reason=d.reason,
                                      pinned=d.pinned, load=d.load, load_unknown=d.load_unknown,
                                      forecast_load=d.forecast_load,
                                      forecast_lead_s=lead_s if d.forecast_load else 0.0,
                                      policy=d.policy) for d in decisions])
        await self.bus.publish(event, msg_id=f"scaling-{now_ms}-{self._sequence}")
        self._last_published = key
        self.current = {d.service: d.replicas for d in decisions}

