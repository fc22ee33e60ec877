"""A real Prometheus (Debian's `prometheus` binary) for tests, scraping what `lmforge up` runs.

It reads the supervisor's file_sd target file (<home>/run/prometheus-targets.json), so
every replica is scraped as it appears, once a second, and answers PromQL over its HTTP
API. When the binary is missing the test fails with the line that installs it: the
Prometheus test is part of the suite, not skipped.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

MISSING = ("prometheus is not installed: `apt-get install -y prometheus` (as root, `make test` "
           "does it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer:
    def __init__(self, workdir: Path, targets_file: Path, *, scrape_interval_s: int = 1) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError(MISSING)
        self.binary = binary
        self.workdir = workdir
        self.port = _free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "prometheus.yml"
        self.config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": f"{scrape_interval_s}s",
                       "evaluation_interval": f"{scrape_interval_s}s"},
            "scrape_configs": [{
                "job_name": "lmforge",
                "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "1s"}],
            }],
        }))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> PrometheusServer:
        log = (self.workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [self.binary, f"--config.file={self.config}",
             f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}: "
                                   f"{(self.workdir / 'prometheus.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1):
                    return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"prometheus not ready in {timeout_s:.0f}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector `promql` evaluates to now (raises on a PromQL error)."""
        data = self._get("/api/v1/query", query=promql)
        return data["result"] if data["resultType"] == "vector" else [
            {"metric": {}, "value": data["result"]}]

    def targets(self) -> list[dict[str, Any]]:
        return self._get("/api/v1/targets")["activeTargets"]
