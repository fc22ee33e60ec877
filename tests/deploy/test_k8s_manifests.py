"""deploy/k8s rendered by kubectl's Kustomize and validated as a cluster would (check.py),
then read for the promises the manifests make: probes, budgets, GPUs, scaling, isolation."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmforge.contracts import subjects
from lmforge.contracts.names import CONSUMES, durable_name
from lmforge.runtime.supervisor import SERVICE_MODULES
from services.cost_autoscaler.settings import default_workloads
from services.trainer.kubernetes_launcher import OBJECT_STORE_SECRET, ClusterConfig, pod_template
from tests.conftest import REPO_ROOT

_spec = importlib.util.spec_from_file_location("k8s_check", REPO_ROOT / "deploy/k8s/check.py")
assert _spec and _spec.loader
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)

OVERLAYS = ("cpu", "gpu")
NATS_SECRET = "lmforge-nats-{}"
"""The Secret holding one service's NATS credential and the CA (deploy/k8s/README.md)."""
NATS_MOUNT = "/etc/lmforge/nats"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("k8s")
    result = {}
    for overlay in OVERLAYS:
        documents, problems = check.check_overlay(REPO_ROOT / "deploy/k8s/overlays" / overlay,
                                                  out)
        assert problems == [], f"{overlay}: {problems}"
        result[overlay] = documents
    return result


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]["containers"][0]


def test_every_overlay_passes_strict_validation_and_the_crd_schemas(rendered):
    assert {d["kind"] for d in rendered["cpu"]} >= {
        "Deployment", "StatefulSet", "PodDisruptionBudget", "NetworkPolicy", "ScaledObject"}


def test_every_service_runs_with_probes_resources_and_a_disruption_budget(rendered):
    docs = rendered["cpu"]
    workloads = default_workloads()
    for service in SERVICE_MODULES:
        workload = workloads.get(service)
        kind = {"deployment": "Deployment", "statefulset": "StatefulSet"}[
            workload.kind] if workload else "Deployment"
        obj = _find(docs, kind, service)
        container = _container(obj)
        assert container["image"] == f"lmforge/{service}:0.1.0"
        resources = container["resources"]
        assert set(resources["requests"]) >= {"cpu", "memory"}
        assert set(resources["limits"]) >= {"cpu", "memory"}
        if service == "inference-gateway":
            assert container["livenessProbe"]["grpc"] == {"port": 50051}
            assert container["readinessProbe"]["grpc"] == {"port": 50051}
        else:
            assert container["livenessProbe"]["httpGet"] == {"path": "/healthz",
                                                             "port": "metrics"}
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz",
                                                              "port": "metrics"}
            assert {"name": "metrics", "containerPort": 9100} in container["ports"]
        budget = _find(docs, "PodDisruptionBudget", service)
        assert budget["spec"]["selector"]["matchLabels"].items() <= (
            obj["spec"]["template"]["metadata"]["labels"].items())


def test_the_gateway_replicas_get_their_ordinal_for_per_replica_consumers(rendered):
    gateway = _find(rendered["cpu"], "StatefulSet", "inference-gateway")
    env = {e["name"]: e for e in _container(gateway)["env"]}
    assert env["LMFORGE_REPLICA"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['apps.kubernetes.io/pod-index']")


def test_nats_is_three_jetstream_nodes_on_volumes_and_streams_are_r3(rendered):
    docs = rendered["cpu"]
    nats = _find(docs, "StatefulSet", "nats")
    assert nats["spec"]["replicas"] == 3
    assert nats["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    conf = _find(docs, "ConfigMap", "nats-config")["data"]["nats.conf"]
    assert "jetstream" in conf and conf.count("nats-headless:6222") == 3
    config = _find(docs, "ConfigMap", "lmforge-config")["data"]
    assert config["LMFORGE_STREAM_REPLICAS"] == "3"
    assert config["LMFORGE_ARTIFACT_URL"].startswith("s3://")
    assert _find(docs, "PodDisruptionBudget", "nats")["spec"]["maxUnavailable"] == 1
    exporter = nats["spec"]["template"]["spec"]["containers"][1]
    assert exporter["image"].startswith("natsio/prometheus-nats-exporter:")


def test_keda_scales_each_queue_consumer_on_its_own_durable_and_the_gateway_on_rps(rendered):
    docs = rendered["cpu"]
    scaled = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    config = _find(docs, "ConfigMap", "lmforge-config")["data"]
    assert set(config["LMFORGE_AUTOSCALER_KEDA_SCALED"].split(",")) == set(scaled)
    for name, obj in scaled.items():
        triggers = obj["spec"]["triggers"]
        if name == "inference-gateway":
            assert obj["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
            assert [t["type"] for t in triggers] == ["prometheus"]
            assert "lmforge_gateway_requests_total" in triggers[0]["metadata"]["query"]
            continue
        assert obj["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1",
                                                 "kind": "Deployment", "name": name}
        consumers = {t["metadata"]["consumer"] for t in triggers
                     if t["type"] == "nats-jetstream" and
                     t["metadata"]["stream"] == subjects.STREAM}
        assert consumers == {durable_name(name, s) for s in CONSUMES[name]}
    # The trainer is the cost-autoscaler's to scale (see scaling.yaml), not KEDA's.
    assert "trainer" not in scaled


def test_only_the_gateway_is_reachable_from_outside_the_namespace(rendered):
    policies = [d for d in rendered["cpu"] if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and
            "ingress" not in p["spec"] and p["spec"]["policyTypes"] == ["Ingress"]]
    assert deny, "no default-deny ingress policy"
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            sources = rule.get("from")
            from_anywhere = not sources or any(
                s.get("namespaceSelector") == {} or "ipBlock" in s for s in sources)
            if from_anywhere:
                assert policy["spec"]["podSelector"] == {
                    "matchLabels": {"app.kubernetes.io/name": "inference-gateway"}}
                continue
            for source in sources:
                if "namespaceSelector" in source:  # one named namespace, monitoring ports
                    names = source["namespaceSelector"]["matchLabels"][
                        "kubernetes.io/metadata.name"]
                    assert names in {"monitoring", "keda"}
                    assert {p["port"] for p in rule["ports"]} <= {9100, 7777, 8222}
                else:
                    assert set(source) == {"podSelector"}  # this namespace only


def test_the_gpu_overlay_gives_the_trainer_and_gateway_a_gpu_and_nothing_else(rendered):
    for overlay, want in (("gpu", True), ("cpu", False)):
        for kind, name in (("Deployment", "trainer"), ("StatefulSet", "inference-gateway"),
                           ("Deployment", "data-prep")):
            pod = _find(rendered[overlay], kind, name)["spec"]["template"]["spec"]
            limits = pod["containers"][0]["resources"]["limits"]
            on_gpu = want and name != "data-prep"
            assert ("nvidia.com/gpu" in limits) == on_gpu, (overlay, name)
            if on_gpu:
                assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
                assert {"key": "nvidia.com/gpu", "operator": "Exists",
                        "effect": "NoSchedule"} in pod["tolerations"]


def test_a_scaled_object_with_a_typo_or_a_wrong_type_is_refused(rendered):
    good = copy.deepcopy(_find(rendered["cpu"], "ScaledObject", "data-prep"))
    assert check.check_custom_resources([good]) == []
    typo = copy.deepcopy(good)
    typo["spec"]["minReplicas"] = typo["spec"].pop("minReplicaCount")
    assert check.check_custom_resources([typo]) == [
        "ScaledObject data-prep: unknown field .spec.minReplicas"]
    wrong = copy.deepcopy(good)
    wrong["spec"]["maxReplicaCount"] = "four"
    (problem,) = check.check_custom_resources([wrong])
    assert problem.startswith("ScaledObject data-prep: spec.maxReplicaCount: 'four' is not")
    unknown = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledJob",
               "metadata": {"name": "x"}, "spec": {}}
    (problem,) = check.check_custom_resources([unknown])
    assert "no CRD for keda.sh/v1alpha1 ScaledJob" in problem


def test_strict_validation_refuses_an_unknown_field_in_a_built_in_kind(rendered, tmp_path):
    deployment = copy.deepcopy(_find(rendered["cpu"], "Deployment", "scheduler"))
    deployment["spec"]["replica"] = 2
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment))
    problems = check.check_built_in(path, check.KUBERNETES_VERSION)
    assert any("replica" in p for p in problems), problems


def _pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Workload name -> its pod spec, for every kind that runs pods."""
    pods = {}
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            pods[doc["metadata"]["name"]] = doc["spec"]["template"]["spec"]
        elif doc["kind"] == "CronJob":
            pods[doc["metadata"]["name"]] = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return pods


def _secrets_read(pod: dict[str, Any]) -> set[str]:
    """Every Secret a pod can read: a volume (secret, projected), envFrom or env."""
    names = set()
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        names |= {s["secret"]["name"] for s in volume.get("projected", {}).get("sources", [])
                  if "secret" in s}
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        names |= {r["secretRef"]["name"] for r in container.get("envFrom", [])
                  if "secretRef" in r}
        names |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
                  if "secretKeyRef" in e.get("valueFrom", {})}
    return names


def _secret_from_dirs(*dirs: Path) -> dict[str, bytes]:
    """`kubectl create secret generic NAME --from-file=DIR ...`: a key per regular file
    directly in each DIR, named as the file; kubectl refuses a key given twice."""
    data: dict[str, bytes] = {}
    for directory in dirs:
        for path in sorted(p for p in directory.iterdir() if p.is_file()):
            assert path.name not in data, f"{path.name} twice: kubectl would refuse it"
            data[path.name] = path.read_bytes()
    return data


def test_each_pod_reads_only_its_own_nats_credential(rendered, tmp_path):
    """The Secrets made as deploy/k8s/README.md says, from the directory `lmforge secrets`
    writes per container (`--from-file=mounts/<service>/nats --from-file=.../tls`): each
    service's pod reads only its own, at /etc/lmforge/nats, read-only, holding its
    credential and the CA (the gateway also its TLS certificate and key) and no other
    service's password; NATS reads none. Beside it, only the object store's Secret."""
    from lmforge.cli.main import main as lmforge_main

    assert lmforge_main(["secrets", str(tmp_path), "--host", "nats",
                         "--gateway-host", "inference-gateway"]) == 0
    made = {NATS_SECRET.format(service): _secret_from_dirs(
        tmp_path / "mounts" / service / "nats", tmp_path / "mounts" / service / "tls")
        for service in SERVICE_MODULES}
    passwords = {c["user"]: c["password"] for c in
                 (json.loads(p.read_text()) for p in (tmp_path / "nats").glob("*.json"))}
    for overlay, docs in rendered.items():
        pods = _pod_specs(docs)
        assert set(pods) == {*SERVICE_MODULES, "nats"}, overlay
        for name, pod in pods.items():
            own = {NATS_SECRET.format(name)} if name in SERVICE_MODULES else set()
            assert _secrets_read(pod) - {OBJECT_STORE_SECRET} == own, (overlay, name)
            for secret in own:
                (volume,) = [v["name"] for v in pod["volumes"]
                             if v.get("secret", {}).get("secretName") == secret]
                mounts = [m for c in pod["containers"] for m in c.get("volumeMounts", [])
                          if m["name"] == volume]
                assert mounts == [{"name": volume, "mountPath": NATS_MOUNT,
                                   "readOnly": True}], (overlay, name)
                keys = {f"{name}.json", "ca.pem"}
                if name == "inference-gateway":
                    keys |= {"gateway.pem", "gateway-key.pem"}
                assert set(made[secret]) == keys, name
                readable = {user for user, password in passwords.items()
                            if any(password.encode() in v for v in made[secret].values())}
                assert readable == {name}, name


def test_the_training_pods_read_no_nats_credential():
    """The Job (and PyTorchJob) pods the trainer's launchers render publish nothing: the
    trainer relays rank 0's log, so they read the object store's Secret and no other."""
    config = ClusterConfig(namespace="lmforge", image="lmforge/trainer:0.1.0")
    for device in ("cpu", "cuda"):
        pod = pod_template(name="lmforge-train-r-abc123", run_id="r", config=config,
                           document={"device": device}, per_node=2, command=["true"])
        assert _secrets_read(pod["spec"]) == {OBJECT_STORE_SECRET}


def test_no_role_reads_secrets_it_does_not_name(rendered):
    """A Role that may get/list/watch secrets reads every service's credential unless
    it names the ones it may (resourceNames)."""
    for overlay, docs in rendered.items():
        for role in (d for d in docs if d["kind"] in {"Role", "ClusterRole"}):
            for rule in role.get("rules", []):
                core = {"", "*"} & set(rule.get("apiGroups", []))
                secrets = {"secrets", "*"} & set(rule.get("resources", []))
                reads = {"get", "list", "watch", "*"} & set(rule.get("verbs", []))
                if core and secrets and reads:
                    assert rule.get("resourceNames"), (overlay, role["metadata"]["name"])
                    assert not {"list", "watch", "*"} & reads, (
                        overlay, role["metadata"]["name"], "list/watch ignore resourceNames")
