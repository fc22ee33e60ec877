"""The shipped alert rules load in Prometheus (promtool check) and each alert fires, or stays
quiet, exactly as alerts_test.yml says (promtool test rules)."""

from __future__ import annotations

import shutil
import subprocess

import yaml

from tests.conftest import REPO_ROOT

RULES = REPO_ROOT / "deploy" / "prometheus"
ALERTS = {"GatewayP99OverSLO", "GatewayErrorRatio", "DeadLettersGrowing", "ConsumerLagGrowing",
          "TrainerStalled", "GPUMemoryNearFull", "CostRateOverBudget"}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: `apt-get install -y prometheus` (`make test` " \
        "does it as root)"
    return subprocess.run([promtool, *args], cwd=RULES, capture_output=True, text=True,
                          timeout=120)


def test_the_alert_rules_load():
    done = _promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 7 rules found" in done.stdout


def test_every_alert_has_unit_tests_and_they_pass():
    tests = yaml.safe_load((RULES / "alerts_test.yml").read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case["alert_rule_test"]
              if t["exp_alerts"]}
    assert tested == ALERTS  # each alert is seen firing at least once
    done = _promtool("test", "rules", "alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
