"""cost-autoscaler settings (env prefix LMFORGE_AUTOSCALER_; shared ones LMFORGE_)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from lmforge.settings import ServiceSettings


class AutoscalerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", frozen=True)

    autoscaler_interval_s: float = Field(5.0, gt=0, description="Seconds between decisions.")
    autoscaler_min_replicas: int = Field(1, ge=0)
    autoscaler_max_replicas: int = Field(2, ge=1)
    autoscaler_backlog_per_replica: int = Field(4, ge=1)
    autoscaler_trainer_jobs_per_replica: int = Field(
        1, ge=1, description="Training jobs (running + queued) one trainer replica takes on.")
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
