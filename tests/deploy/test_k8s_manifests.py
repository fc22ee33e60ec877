"""deploy/k8s rendered by kubectl's Kustomize and validated as a cluster would (check.py),
then read for the promises the manifests make: probes, budgets, GPUs, scaling, isolation."""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
import nats.errors
import pytest
import yaml

from lmforge.bus import ensure_kv, ensure_streams
from lmforge.contracts import subjects
from lmforge.contracts.names import CONSUMES, Bucket, durable_name
from lmforge.runtime.nats_server import free_port, nats_server_binary
from lmforge.runtime.supervisor import SERVICE_MODULES
from lmforge.security.nats_connect import NatsAuth, refused_credentials
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


SECRETS_ARGS = ("--paths-root", "/etc/nats/secrets", "--host", "nats",
                "--host", "nats.lmforge.svc.cluster.local")
"""`lmforge secrets DIR ...` as deploy/k8s/README.md runs it."""


def _secrets_as_readme_makes_them(root: Path) -> dict[str, dict[str, bytes]]:
    """`lmforge secrets` and the README's `kubectl create secret` loop: Secret name -> data.
    Each from its container's directory of mounts/ (`--from-file=mounts/<x>/nats
    --from-file=mounts/<x>/tls`, NATS's `--from-file=mounts/nats-server ...`)."""
    from lmforge.cli.main import main as lmforge_main

    assert lmforge_main(["secrets", str(root), *SECRETS_ARGS,
                         "--gateway-host", "inference-gateway"]) == 0
    mounts = root / "mounts"
    made = {NATS_SECRET.format(name): _secret_from_dirs(mounts / name / "nats",
                                                        mounts / name / "tls")
            for name in (*SERVICE_MODULES, "admin")}
    made[NATS_SECRET.format("server")] = _secret_from_dirs(mounts / "nats-server",
                                                           mounts / "nats-server" / "tls")
    return made


def _secret_volume(pod: dict[str, Any], secret: str) -> dict[str, Any]:
    (volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret]
    return volume


def _materialize(volume: dict[str, Any], data: dict[str, bytes], at: Path) -> None:
    """What the kubelet writes for a secret volume: every key, or only the `items`, each
    at its `path`."""
    items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
    for item in items:
        target = at / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data[item["key"]])


NATS_SERVER_SECRET = ("lmforge-nats-server", "/etc/nats/secrets",
                      {"nats-server.conf", "server.pem", "server-key.pem", "ca.pem"})
NATS_INIT_SECRET = ("lmforge-nats-admin", NATS_MOUNT, {"admin.json", "ca.pem"})


def test_each_pod_reads_only_its_own_nats_credential(rendered, tmp_path):
    """The Secrets made as deploy/k8s/README.md says: each service's pod reads only its
    own, at /etc/lmforge/nats, read-only, holding its credential and the CA (the gateway
    also its TLS certificate and key) and no other service's password, and names it in
    LMFORGE_NATS_CREDS; the nats-init Job reads admin's; NATS its configuration, holding
    password hashes only, and its key. None is optional: a pod without its Secret does
    not start. Beside them, only the object store's Secret."""
    made = _secrets_as_readme_makes_them(tmp_path)
    passwords = {c["user"]: c["password"] for c in
                 (json.loads(p.read_text()) for p in (tmp_path / "nats").glob("*.json"))}
    for overlay, docs in rendered.items():
        config = _find(docs, "ConfigMap", "lmforge-config")["data"]
        assert config["LMFORGE_NATS_URL"].startswith("tls://")
        assert config["LMFORGE_NATS_CA"] == f"{NATS_MOUNT}/ca.pem"
        pods = _pod_specs(docs)
        assert set(pods) == {*SERVICE_MODULES, "nats", "nats-init"}, overlay
        for name, pod in pods.items():
            secret, path, keys = {"nats": NATS_SERVER_SECRET, "nats-init": NATS_INIT_SECRET
                                  }.get(name, (NATS_SECRET.format(name), NATS_MOUNT,
                                               {f"{name}.json", "ca.pem"}))
            if name == "inference-gateway":
                keys = keys | {"gateway.pem", "gateway-key.pem"}
            assert _secrets_read(pod) - {OBJECT_STORE_SECRET} == {secret}, (overlay, name)
            volume = _secret_volume(pod, secret)
            assert "optional" not in volume["secret"], (overlay, name)
            mounts = [m for c in pod["containers"] for m in c.get("volumeMounts", [])
                      if m["name"] == volume["name"]]
            assert mounts == [{"name": volume["name"], "mountPath": path,
                               "readOnly": True}], (overlay, name)
            assert set(made[secret]) == keys, name
            readable = {user for user, password in passwords.items()
                        if any(password.encode() in v for v in made[secret].values())}
            assert readable == ({"admin"} if name == "nats-init" else
                                set() if name == "nats" else {name}), name
            if name != "nats":
                env = {e["name"]: e.get("value") for e in _container(_workload(docs, name))["env"]}
                user = "admin" if name == "nats-init" else name
                assert env["LMFORGE_NATS_CREDS"] == f"{NATS_MOUNT}/{user}.json", name


def _workload(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The workload (Deployment, StatefulSet, Job) named `name`."""
    (found,) = [d for d in docs if d["metadata"]["name"] == name and
                d["kind"] in {"Deployment", "StatefulSet", "Job"}]
    return found


def test_the_nats_config_includes_the_secured_one_before_its_own_settings(rendered):
    """The ConfigMap's configuration starts with the Secret's (users, TLS), so the lines
    after it win where both set something: each node keeps its pod's name."""
    conf = _find(rendered["cpu"], "ConfigMap", "nats-config")["data"]["nats.conf"]
    first, second = conf.splitlines()[:2]
    assert first == "include ../secrets/nats-server.conf"
    assert second == "server_name: $POD_NAME"
    container = _container(_find(rendered["cpu"], "StatefulSet", "nats"))
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert container["args"] == ["--config", f"{mounts['config']}/nats.conf"]
    assert Path(mounts["config"]).parent / "secrets" == Path(mounts["secrets"])


def _may_open_a_route(policies: list[dict[str, Any]], nats_labels: dict[str, str],
                      pod_labels: dict[str, dict[str, str]]) -> set[str]:
    """Which of the pods (name -> labels) the policies let reach the NATS pods' 6222."""
    allowed: set[str] = set()
    for policy in policies:
        selector = policy["spec"]["podSelector"]
        if not _selects(selector, nats_labels):
            continue
        for rule in policy["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            if ports and 6222 not in ports:
                continue
            for source in rule.get("from", []):
                allowed |= {name for name, labels in pod_labels.items()
                            if _selects(source.get("podSelector", {}), labels)}
    return allowed


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector's verdict on a pod's labels (the operators the manifests use)."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        value, op = labels.get(expression["key"]), expression["operator"]
        assert op in {"In", "NotIn"}, op
        if op == "NotIn" and value in expression["values"]:
            return False
        if op == "In" and value not in expression["values"]:
            return False
    return True


def test_only_nats_pods_may_open_a_route(rendered):
    """Routes are plaintext and unauthenticated (nats.yaml says why): a pod that reached
    6222 would see every message. Only NATS's own pods may."""
    docs = rendered["cpu"]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    labels = {name: pod["metadata"]["labels"] for name, pod in (
        (d["metadata"]["name"], d["spec"]["template"]) for d in docs
        if d["kind"] in {"Deployment", "StatefulSet", "Job"})}
    labels["a pod without labels"] = {}
    assert _may_open_a_route(policies, labels["nats"], labels) == {"nats"}


@contextmanager
def _nats_nodes(pods: dict[str, list[str]], root: Path) -> Iterator[list[tuple[int, int]]]:
    """Pod name -> the command its NATS container runs, each run on this machine: flags
    put each on 127.0.0.1 ports, routes to the others. Yields each node's (client port,
    monitoring port) once the first has a JetStream meta leader."""
    ports = [(free_port(), free_port(), free_port()) for _ in pods]
    routes = ",".join(f"nats://127.0.0.1:{cluster}" for _, _, cluster in ports)
    processes = []
    try:
        for (name, command), (client, monitor, cluster) in zip(pods.items(), ports,
                                                                strict=True):
            with (root / f"{name}.log").open("wb") as log:
                processes.append(subprocess.Popen(
                    [*command, "-a", "127.0.0.1", "-p", str(client), "-m", str(monitor),
                     "--cluster", f"nats://127.0.0.1:{cluster}", "--routes", routes],
                    env={**os.environ, "POD_NAME": name}, stdout=log,
                    stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 20
        while not _healthy(ports[0][1]):
            exited = [p.args for p in processes if p.poll() is not None]
            first = next(iter(pods))
            assert not exited and time.monotonic() < deadline, (
                exited, (root / f"{first}.log").read_text()[-2000:])
            time.sleep(0.1)
        yield [(client, monitor) for client, monitor, _ in ports]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _nats_pod(docs: list[dict[str, Any]], secret: dict[str, bytes], root: Path) -> list[str]:
    """One NATS pod's filesystem under `root` ("/"): the ConfigMap's configuration and the
    Secret laid out by the StatefulSet's volumes, every absolute path in either moved
    under `root` and nothing else changed. Returns the container's command."""
    statefulset = _find(docs, "StatefulSet", "nats")
    container = _container(statefulset)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}

    def moved(text: str) -> str:
        for path in sorted(mounts.values(), key=len, reverse=True):
            text = text.replace(path, str(root / Path(path).relative_to("/")))
        return text

    for path in mounts.values():  # the volumes, empty (data, run) until written here
        Path(moved(path)).mkdir(parents=True)
    conf = Path(moved(mounts["config"])) / "nats.conf"
    conf.write_text(moved(_find(docs, "ConfigMap", "nats-config")["data"]["nats.conf"]))
    secrets = Path(moved(mounts["secrets"]))
    _materialize(_secret_volume(statefulset["spec"]["template"]["spec"], NATS_SERVER_SECRET[0]),
                 secret, secrets)
    (secrets / "nats-server.conf").write_text(moved((secrets / "nats-server.conf").read_text()))
    return [str(nats_server_binary()), *(moved(a) for a in container["args"])]


def _healthy(monitor_port: int) -> bool:
    """/healthz: up, JetStream on, a meta leader elected."""
    with suppress(OSError), urllib.request.urlopen(
            f"http://127.0.0.1:{monitor_port}/healthz", timeout=1) as response:
        return bool(response.status == 200)
    return False


def _server_info(port: int) -> dict[str, Any]:
    """The INFO a nats-server sends a fresh TCP connection before anything else."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        line = sock.makefile("rb").readline().decode()
    assert line.startswith("INFO "), line
    return dict(json.loads(line[5:]))


@pytest.mark.connected
def test_the_rendered_nats_cluster_requires_tls_and_each_pods_credential(rendered, tmp_path):
    """The three NATS nodes as the StatefulSet runs them, from what the manifests and
    `lmforge secrets` (as the README runs it) make: the ConfigMap's configuration, and the
    Secret lmforge-nats-server laid out as the StatefulSet's volume lays it out (items).
    Changed only where one machine differs from a pod: the Secret's path in its own
    configuration (rendered for /etc/nats/secrets), ports, store, pid file and routes.
    nats-init's admin then makes every stream and bucket at R3; the scheduler's credential
    from its own Secret connects over TLS verified for the name in LMFORGE_NATS_URL and
    uses them; a connection without a credential is refused, and every node requires TLS
    and a credential and keeps its pod's name."""
    docs = rendered["cpu"]
    made = _secrets_as_readme_makes_them(tmp_path / "made")
    root = tmp_path / "pods"  # "/" of the pods' filesystems

    def mounted(path: str) -> Path:
        return root / Path(path).relative_to("/")

    for name in ("scheduler", "nats-init"):
        secret = NATS_INIT_SECRET[0] if name == "nats-init" else NATS_SECRET.format(name)
        _materialize(_secret_volume(_workload(docs, name)["spec"]["template"]["spec"], secret),
                     made[secret], mounted(NATS_MOUNT))
    config = _find(docs, "ConfigMap", "lmforge-config")["data"]
    replicas = int(config["LMFORGE_STREAM_REPLICAS"])
    replicas_of_nats = _find(docs, "StatefulSet", "nats")["spec"]["replicas"]
    pods = {f"nats-{i}": _nats_pod(docs, made[NATS_SERVER_SECRET[0]], tmp_path / f"nats-{i}")
            for i in range(replicas_of_nats)}

    def auth_of(name: str) -> NatsAuth:
        env = {e["name"]: e.get("value") for e in _container(_workload(docs, name))["env"]}
        return NatsAuth.from_files(mounted(env["LMFORGE_NATS_CREDS"]),
                                   mounted(config["LMFORGE_NATS_CA"]))

    async def exercise(urls: list[str]) -> None:
        dialed = urlsplit(config["LMFORGE_NATS_URL"].split(",")[0])
        assert dialed.scheme == "tls"
        options = {"tls_hostname": dialed.hostname, "allow_reconnect": False,
                   "connect_timeout": 5}
        admin = await nats.connect(urls, **options, **auth_of("nats-init").connect_options())
        try:  # what `lmforge nats-init` does (cli/secrets.py: create_streams_and_buckets)
            await ensure_streams(admin.jetstream(), replicas=replicas)
            for bucket in Bucket:
                await ensure_kv(admin.jetstream(), bucket, replicas=replicas)
        finally:
            await admin.close()
        # One address, as a pod dials the Service: it learns no other (a pod IP).
        scheduler = await nats.connect(urls[0], **options,
                                       **auth_of("scheduler").connect_options())
        try:
            js = scheduler.jetstream()
            await ensure_streams(js, replicas=replicas)  # there: it only reads their info
            assert (await js.stream_info(subjects.STREAM)).config.num_replicas == replicas
            assert scheduler.discovered_servers == []
        finally:
            await scheduler.close()
        with pytest.raises(nats.errors.Error) as refused:
            await nats.connect(urls, **options,
                               **NatsAuth(ca=mounted(config["LMFORGE_NATS_CA"])).connect_options())
        assert refused_credentials(refused.value), refused.value

    with _nats_nodes(pods, tmp_path) as nodes:
        for name, (client, _) in zip(pods, nodes, strict=True):
            info = _server_info(client)
            assert info["tls_required"] and info["auth_required"], info
            assert info["server_name"] == name, info
        asyncio.run(exercise([f"tls://127.0.0.1:{client}" for client, _ in nodes]))


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
