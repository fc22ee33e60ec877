"""The cost ledger: every stage of a run priced, and serving priced by the hour and token.

A stage is charged wall time x the hourly price of the hardware it ran on x
how many devices it used. The wall time is the handler's, from the headers on
the event that closed the stage (`Lmforge-Published-Ns` minus
`Lmforge-Work-Started-Ns`); a finished training attempt uses the trainer's own
measure (`ModelTrained.wall_seconds`). Every attempt of a preempted run is a
charge of its own (`training.preempted` closes one), so a run that was
preempted twice pays for three attempts. A stage replayed from the stage cache
costs nothing and says which run paid.

Savings are what the same hours would have cost on demand minus what was
paid; where the on-demand price of a type is not known the saving is unknown
(null), never claimed as 0.

Serving is not a stage of one run: gateway replicas serve every model. It is
priced as replica-hours (the replicas the autoscaler provisioned, integrated
over time) x the gateway hardware's price, and per 1M tokens from the
gateway's own `lmforge_gateway_generated_tokens_total` counters.

Entries live in the `lmforge_cost_ledger` bucket as JSON: one key per run id,
and `_serving` for serving. `lmforge cost` and `lmforge runs` read them back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from services.cost_autoscaler.pricing import HourlyPrice

SERVING_KEY = "_serving"


@dataclass(frozen=True, slots=True)
class StageCharge:
    stage: str
    attempt: int
    hardware: str
    count: int
    market: str
    wall_seconds: float
    usd_per_hour: float
    """Per device, in the market it ran in."""
    cost_usd: float
    on_demand_cost_usd: float | None
    reused_from: str = ""
    note: str = ""
    """How it was priced when not the plain way (no timing headers, a setting's price)."""


def price_stage(*, stage: str, attempt: int, hardware: str, count: int, market: str,
                wall_seconds: float, price: HourlyPrice, reused_from: str = "",
                note: str = "") -> StageCharge:
    """wall time x price x count; nothing for a stage reused from the cache."""
    hours = 0.0 if reused_from else wall_seconds / 3600
    on_demand = (None if price.on_demand_usd_per_hour is None
                 else round(hours * price.on_demand_usd_per_hour * count, 6))
    return StageCharge(stage=stage, attempt=attempt, hardware=hardware, count=count,
                       market=market, wall_seconds=0.0 if reused_from else wall_seconds,
                       usd_per_hour=price.usd_per_hour,
                       cost_usd=round(hours * price.usd_per_hour * count, 6),
                       on_demand_cost_usd=on_demand, reused_from=reused_from, note=note)


@dataclass(frozen=True, slots=True)
class PlannedHardware:
    """What the scheduler planned for one training attempt."""

    hardware: str
    count: int
    market: str
    usd_per_hour_total: float
    """The planner's price for all `count` devices (0 = the plan carries none)."""


@dataclass
class RunLedger:
    run_id: str
    model_name: str = ""
    tenant: str = ""
    """The run's tenant (the one NATS vouched for at dataset.ready): `lmforge cost` shows a
    tenant's client only its own runs."""
    charges: dict[str, StageCharge] = field(default_factory=dict)
    """By the id of the event that closed the stage: a redelivery replaces, never adds."""
    plans: dict[int, PlannedHardware] = field(default_factory=dict)

    def add(self, key: str, charge: StageCharge) -> None:
        self.charges[key] = charge

    def foreign_tenant(self, tenant: str) -> bool:
        """Whether a charge of `tenant` would hand this entry to another tenant. An entry's
        tenant is set when it is made and never changes: the run id is its first tenant's
        (`lmforge.run_owners`), and whoever the entry names reads its whole history. A
        charge that names no tenant leaves the entry's as it is."""
        return bool(tenant) and tenant != self.tenant

    def latest_plan(self) -> tuple[int, PlannedHardware | None]:
        if not self.plans:
            return 0, None
        attempt = max(self.plans)
        return attempt, self.plans[attempt]

    def totals(self) -> dict[str, Any]:
        charges = list(self.charges.values())
        total = sum(c.cost_usd for c in charges)
        known = [c.on_demand_cost_usd for c in charges]
        on_demand = None if any(v is None for v in known) else sum(v or 0.0 for v in known)
        by_stage: dict[str, float] = {}
        for c in charges:
            by_stage[c.stage] = round(by_stage.get(c.stage, 0.0) + c.cost_usd, 6)
        training = [c for c in charges if c.stage == "trainer"]
        return {
            "total_usd": round(total, 6),
            "on_demand_usd": None if on_demand is None else round(on_demand, 6),
            "spot_savings_usd": None if on_demand is None else round(on_demand - total, 6),
            "by_stage": by_stage,
            "training_attempts": len(training),
            "preempted_attempts": sum(1 for c in training if c.note.startswith("preempted")),
            "wall_seconds": round(sum(c.wall_seconds for c in charges), 3),
        }

    def to_json(self) -> bytes:
        return json.dumps({
            "run_id": self.run_id, "model_name": self.model_name, "tenant": self.tenant,
            "charges": {k: asdict(c) for k, c in self.charges.items()},
            "plans": {str(a): asdict(p) for a, p in self.plans.items()},
            **self.totals(),
        }).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> RunLedger:
        data = json.loads(raw)
        return cls(run_id=data["run_id"], model_name=data.get("model_name", ""),
                   tenant=data.get("tenant", ""),
                   charges={k: StageCharge(**c) for k, c in data.get("charges", {}).items()},
                   plans={int(a): PlannedHardware(**p)
                          for a, p in data.get("plans", {}).items()})


@dataclass
class ServingLedger:
    """The gateway's replica-hours and tokens since the ledger began."""

    hardware: str
    usd_per_hour: float
    replica_seconds: float = 0.0
    cost_usd: float = 0.0
    tokens_by_model: dict[str, float] = field(default_factory=dict)
    unknown_seconds: float = 0.0
    """Seconds in which the token counters could not be read (tokens then not counted)."""

    def add(self, seconds: float, replicas: int, tokens: dict[str, float] | None) -> None:
        """`replicas` provisioned for `seconds`; tokens generated meanwhile (None: unknown)."""
        self.replica_seconds += seconds * replicas
        self.cost_usd += seconds / 3600 * replicas * self.usd_per_hour
        if tokens is None:
            self.unknown_seconds += seconds
            return
        for model, count in tokens.items():
            self.tokens_by_model[model] = self.tokens_by_model.get(model, 0.0) + count

    def to_json(self) -> bytes:
        tokens = sum(self.tokens_by_model.values())
        return json.dumps({
            **asdict(self),
            "replica_hours": round(self.replica_seconds / 3600, 6),
            "tokens": tokens,
            "usd_per_million_tokens": round(self.cost_usd / tokens * 1e6, 6) if tokens else None,
        }).encode()

    @classmethod
    def from_json(cls, raw: bytes, *, hardware: str, usd_per_hour: float) -> ServingLedger:
        """The stored totals, going on at today's hardware and price."""
        data = json.loads(raw)
        return cls(hardware=hardware, usd_per_hour=usd_per_hour,
                   replica_seconds=float(data.get("replica_seconds", 0.0)),
                   cost_usd=float(data.get("cost_usd", 0.0)),
                   tokens_by_model={k: float(v) for k, v in
                                    data.get("tokens_by_model", {}).items()},
                   unknown_seconds=float(data.get("unknown_seconds", 0.0)))

