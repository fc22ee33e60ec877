"""cost-autoscaler settings (env prefix LMFORGE_AUTOSCALER_; shared ones LMFORGE_)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from lmforge.contracts.names import SERVICES, ServiceName
from lmforge.settings import ServiceSettings
from services.cost_autoscaler.actuators import Workload
from services.cost_autoscaler.forecasting import ForecastConfig
from services.cost_autoscaler.policy import PolicyConfig

POD_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def default_workloads() -> dict[str, Workload]:
    """deploy/k8s's names: a Deployment per service, the gateway a StatefulSet."""
    workloads = {str(s): Workload("deployment", str(s)) for s in SERVICES
                 if s != ServiceName.COST_AUTOSCALER}
    workloads[ServiceName.INFERENCE_GATEWAY] = Workload("statefulset",
                                                        ServiceName.INFERENCE_GATEWAY)
    return workloads


class AutoscalerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", frozen=True)

    autoscaler_interval_s: float = Field(5.0, gt=0, description="Seconds between decisions.")
    autoscaler_min_replicas: int = Field(1, ge=0)
    autoscaler_max_replicas: int = Field(2, ge=1)
    autoscaler_backlog_per_replica: int = Field(4, ge=1)
    autoscaler_trainer_jobs_per_replica: int = Field(
        1, ge=1, description="Training jobs (running + queued) one trainer replica takes on.")
    autoscaler_rps_per_replica: float = Field(
        20.0, gt=0, description="Requests/s one gateway replica serves with its p99 latency "
        "within AUTOSCALER_SLO_P99_MS: fill it from benchmarks/gateway_load.py "
        "(requests_per_s of a run whose e2e_p99_ms is within the SLO).")
    autoscaler_slo_p99_ms: float = Field(
        500.0, gt=0, description="The p99 latency SLO the replica capacity was measured at.")
    autoscaler_scale_down_after: int = Field(
        3, ge=1, description="Consecutive low readings before a service scales in.")
    autoscaler_scale_in_cooldown_s: float = Field(
        300.0, ge=0, description="No scale-in sooner than this after a service's last change.")
    autoscaler_gateway_cold_start_s: float = Field(
        120.0, ge=0, description="Seconds from asking for a gateway replica to its serving "
        "(process start + model load); the forecast lead must cover it.")
    autoscaler_forecast: bool = Field(
        True, description="Provision the gateway for the forecast load (off: reactive only).")
    autoscaler_forecast_lead_s: float = Field(
        900.0, gt=0, description="How far ahead the gateway's load is forecast (and its peak "
        "reported); replicas are provisioned for cold start + one round ahead.")
    autoscaler_forecast_quantile: float = Field(
        0.8, ge=0.5, lt=1.0, description="Upper quantile of the forecast provisioned for "
        "(0.8: chosen on the training week, benchmarks/autoscale_tune.py).")
    autoscaler_forecast_refit_s: float = Field(
        6 * 3600.0, ge=300, description="Seconds between forecast fits (not every round).")
    autoscaler_history_days: float = Field(
        28.0, gt=1, description="Days of 5-minute load history kept (and fitted on).")
    autoscaler_gateway_hardware: str = Field(
        "cpu", description="The hardware a gateway replica runs on (a key of "
        "AUTOSCALER_PRICE_PER_HOUR): serving is priced as its replica-hours.")
    autoscaler_gateway_metrics: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Gateway /metrics URLs, comma separated."
    )
    autoscaler_price_per_hour: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=lambda: {"cpu": 0.10, "cuda": 2.50},
        description="Pool prices, e.g. 'cpu=0.10,cuda=2.50'.",
    )

    autoscaler_actuator: Literal["supervisor", "kubernetes"] = Field(
        "supervisor", description="Who applies decisions: the `lmforge up` supervisor, or "
        "the Kubernetes API (the scale subresource of each service's workload).")
    autoscaler_kubernetes_namespace: str = Field(
        "", description="Namespace of the workloads; empty: the pod's own namespace.")
    autoscaler_kubernetes_workloads: Annotated[dict[str, Workload], NoDecode] = Field(
        default_factory=default_workloads,
        description="service=deployment/NAME or service=statefulset/NAME, comma separated.")
    autoscaler_keda_scaled: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Services whose workload a KEDA ScaledObject of the "
        "same name scales: left to KEDA unless pinned (then paused at the pin).")

    @field_validator("autoscaler_kubernetes_workloads", mode="before")
    @classmethod
    def _parse_workloads(cls, value: object) -> object:
        if isinstance(value, str):
            workloads = {}
            for item in filter(None, (v.strip() for v in value.split(","))):
                service, sep, workload = item.partition("=")
                if not sep:
                    raise ValueError(f"workload {item!r} is not service=kind/name")
                workloads[service.strip()] = Workload.parse(workload.strip())
            return workloads
        return value

    @field_validator("autoscaler_kubernetes_workloads", "autoscaler_keda_scaled")
    @classmethod
    def _known_services(cls, value: dict[str, Workload] | list[str]
                        ) -> dict[str, Workload] | list[str]:
        unknown = sorted(set(value) - set(SERVICES))
        if unknown:
            raise ValueError(f"unknown services {unknown}; known: {', '.join(SERVICES)}")
        return value

    def kubernetes_namespace(self) -> str:
        if self.autoscaler_kubernetes_namespace:
            return self.autoscaler_kubernetes_namespace
        if POD_NAMESPACE_FILE.is_file():
            return POD_NAMESPACE_FILE.read_text().strip()
        raise ValueError("LMFORGE_AUTOSCALER_KUBERNETES_NAMESPACE is empty and this is not "
                         f"a pod ({POD_NAMESPACE_FILE} is missing): name the namespace")

    autoscaler_spot_price_per_hour: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict, description="Spot prices by device or instance type, "
        "e.g. 'cuda=0.90' (a plan's own price, from the planner's catalog, comes first).")
    autoscaler_stage_hardware: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="What the stages that do not say run on, e.g. "
        "'quantizer=cuda' (default cpu for data-prep, scheduler, quantizer, exporter).")

    @field_validator("autoscaler_stage_hardware", mode="before")
    @classmethod
    def _parse_hardware(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = {}
            for item in filter(None, (v.strip() for v in value.split(","))):
                stage, sep, hardware = item.partition("=")
                if not sep or not hardware.strip():
                    raise ValueError(f"stage hardware {item!r} is not stage=hardware")
                pairs[stage.strip()] = hardware.strip()
            return pairs
        return value

    @field_validator("autoscaler_gateway_metrics", "autoscaler_keda_scaled", mode="before")
    @classmethod
    def _parse_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("autoscaler_price_per_hour", "autoscaler_spot_price_per_hour",
                     mode="before")
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
        reach = self.autoscaler_gateway_cold_start_s + self.autoscaler_interval_s
        if self.autoscaler_forecast_lead_s < reach:
            raise ValueError(
                f"LMFORGE_AUTOSCALER_FORECAST_LEAD_S={self.autoscaler_forecast_lead_s:g} is "
                f"shorter than a replica's cold start plus one round (LMFORGE_AUTOSCALER_"
                f"GATEWAY_COLD_START_S={self.autoscaler_gateway_cold_start_s:g} + "
                f"LMFORGE_AUTOSCALER_INTERVAL_S={self.autoscaler_interval_s:g}): the forecast "
                f"would not reach the load the replicas asked for now must serve")
        return self

    def policy_config(self) -> PolicyConfig:
        return PolicyConfig(
            min_replicas=self.autoscaler_min_replicas, max_replicas=self.autoscaler_max_replicas,
            backlog_per_replica=self.autoscaler_backlog_per_replica,
            trainer_jobs_per_replica=self.autoscaler_trainer_jobs_per_replica,
            rps_per_replica=self.autoscaler_rps_per_replica,
            scale_down_after=self.autoscaler_scale_down_after,
            scale_in_cooldown_s=self.autoscaler_scale_in_cooldown_s)

    def forecast_config(self) -> ForecastConfig:
        return ForecastConfig(lead_s=self.autoscaler_forecast_lead_s,
                              ready_after_s=self.autoscaler_gateway_cold_start_s,
                              decide_every_s=self.autoscaler_interval_s,
                              refit_every_s=self.autoscaler_forecast_refit_s,
                              quantile=self.autoscaler_forecast_quantile,
                              max_history_days=self.autoscaler_history_days)
