"""Who carries out a scaling decision: the local supervisor, or a Kubernetes cluster.

The policy decides; an `Actuator` applies. `scaling.decided` is published either
way (it is the record the CLI, the ledger and the status page read).

- `SupervisorActuator` (`LMFORGE_AUTOSCALER_ACTUATOR=supervisor`, the default):
  `lmforge up`'s supervisor consumes scaling.decided and starts or stops
  processes, so this side has nothing left to do.
- `KubernetesActuator` (`=kubernetes`): patches the `scale` subresource of each
  service's Deployment (the gateway's StatefulSet: each gateway replica needs its
  own ordinal for its per-replica consumer) through the official client. It reads
  the scale first and patches only a difference, so a round that changes nothing
  sends no write. A workload that KEDA scales (listed in
  `LMFORGE_AUTOSCALER_KEDA_SCALED`) is left to KEDA's HPA, which would otherwise
  undo the patch within seconds; a pin on such a service is applied as KEDA's
  `autoscaling.keda.sh/paused-replicas` annotation on its ScaledObject (KEDA then
  holds the workload at exactly that count) and removed when the pin is. SRE pins
  therefore win on every workload, KEDA-scaled or not.

A failure on one workload is reported and the others are still applied: a
missing Deployment must not freeze the trainer's scale.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from services.cost_autoscaler.policy import Decision

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from services.cost_autoscaler.settings import AutoscalerSettings

log = logging.getLogger("lmforge.autoscaler.actuators")

PAUSED_REPLICAS = "autoscaling.keda.sh/paused-replicas"
"""KEDA's annotation: hold the target at this many replicas and stop autoscaling it."""
KEDA_GROUP, KEDA_VERSION, SCALED_OBJECTS = "keda.sh", "v1alpha1", "scaledobjects"


@dataclass(frozen=True, slots=True)
class Workload:
    """The Kubernetes object that runs one service."""

    kind: str
    """'deployment' or 'statefulset'."""
    name: str

    @classmethod
    def parse(cls, text: str) -> Workload:
        kind, sep, name = text.partition("/")
        if not sep or kind not in ("deployment", "statefulset") or not name:
            raise ValueError(f"workload {text!r} is not deployment/NAME or statefulset/NAME")
        return cls(kind, name)


@dataclass(frozen=True, slots=True)
class Applied:
    """What an actuator did about one decision."""

    service: str
    replicas: int
    action: str
    """'scaled 1->2', 'unchanged', 'paused at 3 (pinned)', 'left to KEDA', 'failed: ...'."""


class Actuator(Protocol):
    async def apply(self, decisions: Sequence[Decision]) -> list[Applied]: ...


class SupervisorActuator:
    """`lmforge up`: the supervisor applies the published scaling.decided itself."""

    async def apply(self, decisions: Sequence[Decision]) -> list[Applied]:
        return [Applied(d.service, d.replicas, "published for the supervisor")
                for d in decisions]


class KubernetesActuator:
    """Applies decisions to a cluster's workloads (see the module docstring)."""

    def __init__(self, api_client: ApiClient, *, namespace: str,
                 workloads: dict[str, Workload], keda_scaled: frozenset[str] = frozenset()
                 ) -> None:
        from kubernetes import client

        self.namespace = namespace
        self.workloads = workloads
        self.keda_scaled = keda_scaled
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    async def apply(self, decisions: Sequence[Decision]) -> list[Applied]:
        return await asyncio.to_thread(self._apply_all, decisions)

    def _apply_all(self, decisions: Sequence[Decision]) -> list[Applied]:
        from kubernetes.client.exceptions import ApiException

        applied = []
        for decision in decisions:
            workload = self.workloads.get(decision.service)
            if workload is None:
                continue  # not run as a workload of its own here (the autoscaler itself)
            try:
                if decision.service in self.keda_scaled:
                    action = self._steer_keda(workload, decision)
                else:
                    action = self._scale(workload, decision.replicas)
            except ApiException as exc:
                action = (f"failed: {workload.kind}/{workload.name} in {self.namespace}: "
                          f"{exc.status} {exc.reason}")
                log.warning("cannot apply %s=%d: %s", decision.service, decision.replicas,
                            action)
            applied.append(Applied(decision.service, decision.replicas, action))
        return applied

    def _scale(self, workload: Workload, replicas: int) -> str:
        if workload.kind == "deployment":
            read, patch = (self.apps.read_namespaced_deployment_scale,
                           self.apps.patch_namespaced_deployment_scale)
        else:
            read, patch = (self.apps.read_namespaced_stateful_set_scale,
                           self.apps.patch_namespaced_stateful_set_scale)
        have = read(workload.name, self.namespace).spec.replicas
        if have == replicas:
            return "unchanged"
        patch(workload.name, self.namespace, {"spec": {"replicas": replicas}},
              _content_type="application/merge-patch+json")
        log.info("scaled %s/%s %s->%d", workload.kind, workload.name, have, replicas)
        return f"scaled {have}->{replicas}"

    def _steer_keda(self, workload: Workload, decision: Decision) -> str:
        scaled_object: dict[str, Any] = self.custom.get_namespaced_custom_object(
            KEDA_GROUP, KEDA_VERSION, self.namespace, SCALED_OBJECTS, workload.name)
        annotations = scaled_object.get("metadata", {}).get("annotations") or {}
        paused = annotations.get(PAUSED_REPLICAS)
        want = str(decision.replicas) if decision.pinned else None
        if paused == want:
            return f"paused at {want} (pinned)" if want else "left to KEDA"
        self.custom.patch_namespaced_custom_object(
            KEDA_GROUP, KEDA_VERSION, self.namespace, SCALED_OBJECTS, workload.name,
            {"metadata": {"annotations": {PAUSED_REPLICAS: want}}},
            _content_type="application/merge-patch+json")
        if want is None:
            log.info("unpinned %s: KEDA scales it again", workload.name)
            return "pin removed; left to KEDA"
        log.info("pinned %s at %s through its ScaledObject", workload.name, want)
        return f"paused at {want} (pinned)"


def kubernetes_api_client() -> ApiClient:
    """In a pod: its service account. Elsewhere: the kubeconfig (KUBECONFIG or ~/.kube)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            # KUBECONFIG read now: the client's default was fixed when it was imported.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        except (config.ConfigException, OSError) as exc:
            raise RuntimeError(
                "LMFORGE_AUTOSCALER_ACTUATOR=kubernetes needs a cluster: run in a pod with a "
                f"service account, or set KUBECONFIG ({exc})") from None
    return client.ApiClient()


def build_actuator(settings: AutoscalerSettings) -> Actuator:
    if settings.autoscaler_actuator == "supervisor":
        return SupervisorActuator()
    return KubernetesActuator(
        kubernetes_api_client(), namespace=settings.kubernetes_namespace(),
        workloads=settings.autoscaler_kubernetes_workloads,
        keda_scaled=frozenset(settings.autoscaler_keda_scaled))
