"""What an hour of hardware costs: the one seam a hardware catalog plugs into.

The prices are the hardware catalog's (libs/lmforge/catalog.json, merged with
the user's LMFORGE_CATALOG: per device, on-demand and spot) under the
autoscaler's own settings, which win: `AUTOSCALER_PRICE_PER_HOUR` (on-demand,
per device kind or instance type: `cpu`, `cuda` price the stages that name
only a device) and `AUTOSCALER_SPOT_PRICE_PER_HOUR`.
A training attempt whose plan carries the planner's own price
(`ResourcePlan.price_usd_per_hour`, from its catalog) is charged that price,
and its on-demand equivalent comes from here: when this book does not know
the type, the saving is unknown (None), never 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.catalog import Catalog

SPOT = "spot"
ON_DEMAND = "on-demand"


@dataclass(frozen=True, slots=True)
class HourlyPrice:
    """One device (or instance) for one hour, in the market it ran in."""

    usd_per_hour: float
    on_demand_usd_per_hour: float | None
    """What the same hour costs on demand; None when not known (no saving claimed)."""
    source: str


class UnknownHardwareError(LookupError):
    """No price for a device or instance type."""


@dataclass(frozen=True, slots=True)
class PriceBook:
    on_demand: dict[str, float]
    spot: dict[str, float]

    def price(self, hardware: str, *, market: str = ON_DEMAND) -> HourlyPrice:
        """$/h of one `hardware` in `market` ("spot" or "on-demand")."""
        on_demand = self.on_demand.get(hardware)
        if market == SPOT:
            if hardware not in self.spot:
                raise UnknownHardwareError(
                    f"no spot price for {hardware!r} in the catalog or "
                    f"LMFORGE_AUTOSCALER_SPOT_PRICE_PER_HOUR")
            return HourlyPrice(self.spot[hardware], on_demand, "autoscaler settings (spot)")
        if on_demand is None:
            raise UnknownHardwareError(
                f"no price for {hardware!r} in the catalog or "
                f"LMFORGE_AUTOSCALER_PRICE_PER_HOUR")
        return HourlyPrice(on_demand, on_demand, "autoscaler settings")

    def on_demand_price(self, hardware: str) -> float | None:
        return self.on_demand.get(hardware)


def price_book(catalog: Catalog, on_demand: dict[str, float], spot: dict[str, float]
               ) -> PriceBook:
    """The catalog's per-device prices, with the settings' prices over them."""
    catalog_on_demand = {name: t.on_demand_usd_per_hour for name, t in catalog.types.items()}
    catalog_spot = {name: t.spot_usd_per_hour for name, t in catalog.types.items()
                    if t.spot_usd_per_hour is not None}
    return PriceBook({**catalog_on_demand, **on_demand}, {**catalog_spot, **spot})
