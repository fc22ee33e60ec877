"""The Kubernetes actuator through the official client, against a stand-in API server.

No cluster runs here: tests/kube_api_server.py speaks the scale subresource and
KEDA's ScaledObject over HTTP on 127.0.0.1, so what is checked is the client's
real requests (paths, verbs, patch type, bodies), not a mocked method.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from kubernetes import client

from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket, ServiceName
from services.cost_autoscaler.actuators import (
    PAUSED_REPLICAS,
    KubernetesActuator,
    Workload,
)
from services.cost_autoscaler.handlers import AutoscalerService
from services.cost_autoscaler.policy import Decision
from services.cost_autoscaler.settings import AutoscalerSettings, default_workloads
from tests.buses import NatsHarness
from tests.kube_api_server import StandInCluster, start_kube_api

pytestmark = pytest.mark.servers

NS = "lmforge"


@pytest.fixture
def cluster() -> Iterator[tuple[StandInCluster, str]]:
    state = StandInCluster()
    for workload in default_workloads().values():
        state.replicas[(workload.kind + "s", NS, workload.name)] = 1
    state.scaled_objects[(NS, "data-prep")] = {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"name": "data-prep", "namespace": NS, "annotations": {}}}
    server, url = start_kube_api(state)
    yield state, url
    server.shutdown()
    server.server_close()


def _actuator(url: str, **kwargs) -> KubernetesActuator:
    config = client.Configuration(host=url)
    return KubernetesActuator(client.ApiClient(config), namespace=NS,
                              workloads=default_workloads(), **kwargs)


def test_a_decision_patches_the_scale_subresource_only_when_it_differs(cluster):
    state, url = cluster
    actuator = _actuator(url)
    applied = asyncio.run(actuator.apply([
        Decision("trainer", 3, "backlog 3", False, 3.0),
        Decision("scheduler", 1, "backlog 0", False, 0.0),
        Decision("inference-gateway", 2, "41.0 req/s", False, 41.0),
        Decision("cost-autoscaler", 1, "backlog 0", False, 0.0)]))
    assert [(a.service, a.action) for a in applied] == [
        ("trainer", "scaled 1->3"), ("scheduler", "unchanged"),
        ("inference-gateway", "scaled 1->2")]
    assert state.replicas[("deployments", NS, "trainer")] == 3
    assert state.replicas[("statefulsets", NS, "inference-gateway")] == 2
    patches = state.patches()
    assert [(p.path, p.body, p.content_type) for p in patches] == [
        (f"/apis/apps/v1/namespaces/{NS}/deployments/trainer/scale",
         {"spec": {"replicas": 3}}, "application/merge-patch+json"),
        (f"/apis/apps/v1/namespaces/{NS}/statefulsets/inference-gateway/scale",
         {"spec": {"replicas": 2}}, "application/merge-patch+json")]


def test_a_keda_scaled_service_is_left_to_keda_unless_pinned(cluster):
    state, url = cluster
    actuator = _actuator(url, keda_scaled=frozenset({"data-prep"}))
    unpinned = [Decision("data-prep", 2, "backlog 8", False, 8.0)]
    assert asyncio.run(actuator.apply(unpinned))[0].action == "left to KEDA"
    assert state.patches() == []  # KEDA's HPA owns the replica count
    pinned = [Decision("data-prep", 4, "pinned by SRE", True, 8.0)]
    assert asyncio.run(actuator.apply(pinned))[0].action == "paused at 4 (pinned)"
    annotations = state.scaled_objects[(NS, "data-prep")]["metadata"]["annotations"]
    assert annotations == {PAUSED_REPLICAS: "4"}
    assert state.replicas[("deployments", NS, "data-prep")] == 1  # KEDA moves it, not us
    assert asyncio.run(actuator.apply(unpinned))[0].action == "pin removed; left to KEDA"
    assert state.scaled_objects[(NS, "data-prep")]["metadata"]["annotations"] == {}


def test_a_missing_workload_is_reported_and_the_others_still_scale(cluster):
    state, url = cluster
    del state.replicas[("deployments", NS, "quantizer")]
    applied = asyncio.run(_actuator(url).apply([
        Decision("quantizer", 2, "backlog 8", False, 8.0),
        Decision("exporter", 2, "backlog 8", False, 8.0)]))
    assert applied[0].action == f"failed: deployment/quantizer in {NS}: 404 Not Found"
    assert applied[1].action == "scaled 1->2"


def test_workloads_setting_parses_and_refuses_unknown_services(monkeypatch):
    monkeypatch.setenv("LMFORGE_AUTOSCALER_KUBERNETES_WORKLOADS",
                       "trainer=deployment/lmforge-trainer,inference-gateway=statefulset/gw")
    settings = AutoscalerSettings()
    assert settings.autoscaler_kubernetes_workloads == {
        "trainer": Workload("deployment", "lmforge-trainer"),
        "inference-gateway": Workload("statefulset", "gw")}
    monkeypatch.setenv("LMFORGE_AUTOSCALER_KUBERNETES_WORKLOADS", "trainr=deployment/t")
    with pytest.raises(ValueError, match=r"unknown services \['trainr'\]"):
        AutoscalerSettings()
    monkeypatch.setenv("LMFORGE_AUTOSCALER_KUBERNETES_WORKLOADS", "trainer=daemonset/t")
    with pytest.raises(ValueError, match="is not deployment/NAME or statefulset/NAME"):
        AutoscalerSettings()


@pytest.mark.connected
def test_an_sre_pin_reaches_the_cluster_through_the_scaling_loop(nats_server, cluster,
                                                                 tmp_path, monkeypatch):
    """The whole path: `lmforge scale trainer=2`'s KV pin -> policy -> scale subresource."""
    state, url = cluster
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: standin\n"
        f"clusters: [{{name: standin, cluster: {{server: '{url}'}}}}]\n"
        "users: [{name: standin, user: {token: standin-token}}]\n"
        "contexts: [{name: standin, context: {cluster: standin, user: standin}}]\n")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    harness = NatsHarness(nats_server.url)

    async def scenario() -> None:
        client_ = await harness.client()
        kv = await client_.js.create_key_value(bucket=Bucket.SCALE_PINS)
        await kv.put(ServiceName.TRAINER, b"2")
        async with harness.service(AutoscalerService, home=tmp_path, autoscaler_interval_s=0.2,
                                   autoscaler_actuator="kubernetes",
                                   autoscaler_kubernetes_namespace=NS,
                                   autoscaler_max_replicas=1):
            await harness.wait_for(subjects.SCALING_DECIDED, 1)
            for _ in range(50):
                if state.replicas[("deployments", NS, "trainer")] == 2:
                    break
                await asyncio.sleep(0.1)

    asyncio.run(scenario())
    # Pinned above max_replicas=1: the pin wins.
    assert state.replicas[("deployments", NS, "trainer")] == 2
    trainer_patches = [p for p in state.patches() if "/deployments/trainer/" in p.path]
    assert trainer_patches[0].body == {"spec": {"replicas": 2}}
    authorised = [r for r in state.requests if "/deployments/trainer/" in r.path]
    assert authorised  # the kubeconfig's server was the one called
