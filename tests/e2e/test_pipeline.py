"""The whole system through the CLI: up, run --follow, Generate, one trace, restarts, down."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import nats
import nats.errors
import numpy as np
import openai
import pytest
import tritonclient.grpc as triton

from lmforge.cli.up import home_nats_auth
from lmforge.contracts.v1 import generate_pb2, generate_pb2_grpc
from lmforge.runtime.scrape_targets import targets_file
from tests.conftest import REPO_ROOT, TEST_DATA
from tests.otlp_receiver import OtlpTraceReceiver
from tests.prometheus_server import PrometheusServer
from tests.status_page_browser import StatusPageBrowser, StatusPageCommand

pytestmark = pytest.mark.e2e

SEVEN = {"data-prep", "scheduler", "trainer", "quantizer", "exporter", "inference-gateway",
         "cost-autoscaler"}


ARTIFACTS = Path(os.environ.get("LMFORGE_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))
"""Where the report and screenshots of the run are kept for a person to look at."""
DASHBOARDS = REPO_ROOT / "deploy" / "grafana" / "dashboards"

STAGE_OUTPUTS = {"lmforge.dataset.prepared", "lmforge.training.scheduled",
                 "lmforge.model.trained", "lmforge.model.quantized", "lmforge.model.exported"}


def tmp_home(env) -> Path:
    return Path(env["LMFORGE_HOME"])


async def run_events(nats_url: str, run_id: str, home: Path
                     ) -> list[tuple[str, dict[str, str]]]:
    """(subject, headers) of the stage outputs and progress events of `run_id`."""
    nc = await nats.connect(nats_url, **home_nats_auth(home, "admin").connect_options())
    found = []
    try:
        for subject in sorted(STAGE_OUTPUTS | {"lmforge.training.progress"}):
            sub = await nc.jetstream().subscribe(subject, ordered_consumer=True)
            while True:
                try:
                    msg = await sub.next_msg(timeout=1)
                except nats.errors.TimeoutError:
                    break
                if (msg.headers or {}).get("Lmforge-Run-Id") == run_id:
                    found.append((msg.subject, dict(msg.headers or {})))
            await sub.unsubscribe()
    finally:
        await nc.close()
    return found


def lmforge(env, *args, timeout=120, check=True):
    done = subprocess.run([sys.executable, "-m", "lmforge.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"lmforge {' '.join(args)} -> {done.returncode}\n"
                             f"{done.stdout}\n{done.stderr}")
    return done


def wait_for_service(env, name, condition, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = json.loads(lmforge(env, "status", "--json").stdout)["services"][name]
        if condition(state):
            return state
        time.sleep(0.5)
    raise AssertionError(f"{name} never reached the expected state: {state}")


@pytest.fixture
def system(tmp_path):
    receiver = OtlpTraceReceiver().start()
    env = {
        **os.environ,
        "LMFORGE_HOME": str(tmp_path / "home"),
        "LMFORGE_DATA_ROOTS": f"{TEST_DATA}{os.pathsep}{tmp_path / 'data'}",
        "LMFORGE_DATAPREP_VOCAB_SIZE": "1024",
        "LMFORGE_DATAPREP_SEQ_LEN": "64",
        "LMFORGE_SCHEDULER_TIME_BUDGET_S": "8",
        "LMFORGE_AUTOSCALER_INTERVAL_S": "1",
        "LMFORGE_TRAINER_PEAK_TFLOPS": "0.05",  # a rough CPU peak, so MFU is reported
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    lmforge(env, "up", "-d", "--gateway-port", "0")
    prometheus = PrometheusServer(tmp_path / "prometheus", targets_file(tmp_path / "home"))
    try:
        prometheus.start()
        yield env, receiver, prometheus
    finally:
        prometheus.stop()
        lmforge(env, "down", timeout=120, check=False)
        receiver.stop()


def watch_run_on_status_page(env, workdir: Path, run_id: str
                             ) -> tuple[list[dict[str, str]], list[str]]:
    """Start `lmforge run --follow` while chromium shows `lmforge ui`; return the run's
    row as the page showed it, state by state, and the browser's console errors. Saves
    test-artifacts/status-page-training.png (mid-training) and status-page.png (served)."""
    ui = StatusPageCommand(env, workdir / "ui.log")
    try:
        with StatusPageBrowser(ui.url) as browser:
            assert browser.run_row(run_id) is None
            assert browser.page.locator("#services tr[data-service]").count() == len(SEVEN)
            run_log = workdir / "run-follow.log"
            with run_log.open("wb") as log:
                follow = subprocess.Popen(
                    [sys.executable, "-m", "lmforge.cli.main", "run",
                     str(TEST_DATA / "fortunes-sample.txt"), "--model-name", "fortune",
                     "--run-id", run_id, "--follow", "--timeout", "600"],
                    env=env, stdout=log, stderr=subprocess.STDOUT)
                shots: list[Path] = []

                def training_screenshot(row: dict[str, str]) -> None:
                    if not shots and row["stage"] == "trainer" and int(row["step"]) > 0:
                        shots.append(browser.screenshot(
                            ARTIFACTS / "status-page-training.png"))

                seen = browser.watch_run(run_id, until_done=follow, timeout_s=660,
                                         on_change=training_screenshot)
                follow.wait(30)
            assert follow.returncode == 0, run_log.read_text()
            assert "served as model fortune" in run_log.read_text()
            # Served, at its precision, and priced: what the final screenshot shows.
            browser.page.wait_for_selector(
                f'#runs tr[data-run-id="{run_id}"][data-status="served"]'
                ':not([data-cost-usd=""])', timeout=30_000)
            browser.page.wait_for_selector('#models tr[data-model^="fortune "]',
                                           timeout=30_000)
            seen.append(browser.run_row(run_id) or {})
            row = browser.page.locator(f'#runs tr[data-run-id="{run_id}"] td')
            assert row.nth(2).inner_text() == "served"  # not "queued #1" from the past
            browser.screenshot(ARTIFACTS / "status-page.png")
            return seen, list(browser.errors)
    finally:
        ui.stop()


def _has_value(result: list[dict]) -> bool:
    return any(float(r["value"][1]) == float(r["value"][1]) for r in result)  # not NaN


def assert_promql_answers(prometheus: PrometheusServer, queries: dict[str, str],
                          timeout_s: float = 30) -> dict[str, list[dict]]:
    """Every query returns at least one non-NaN sample (scrapes are 1 s apart: wait a little)."""
    deadline = time.monotonic() + timeout_s
    while True:
        answers = {name: prometheus.query(q) for name, q in queries.items()}
        empty = {name: queries[name] for name, a in answers.items() if not _has_value(a)}
        if not empty:
            return answers
        if time.monotonic() > deadline:
            raise AssertionError(f"PromQL without data after {timeout_s:.0f}s: {empty}")
        time.sleep(1)


def test_a_run_goes_from_text_to_a_served_model_in_one_trace(system):
    env, receiver, prometheus = system
    status = json.loads(lmforge(env, "status", "--json").stdout)
    assert set(status["services"]) == SEVEN
    assert all(s["state"] == "running" and s["replicas"] == 1
               for s in status["services"].values())
    assert status["nats_url"].startswith("tls://127.0.0.1:")  # secured by default
    assert status["nats"]["security"] == "tls+credentials"

    # The status page (`lmforge ui`) in headless chromium watches the run from before it
    # starts until it is served, without a reload: its own polling must show it advance.
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    seen, errors = watch_run_on_status_page(env, tmp_home(env).parent, "e2e-run")
    trainer_steps = [int(row["step"]) for row in seen
                     if row["stage"] == "trainer" and row["status"] == "running"]
    assert seen[0]["status"] != "served", seen  # it appeared before it was done
    assert len(set(trainer_steps)) >= 2 and trainer_steps == sorted(trainer_steps), seen
    assert seen[-1]["status"] == "served", seen
    assert not errors, errors

    # A model trained for a few steps may sample end-of-text first for a given seed
    # (a valid, empty answer): a few seeds, and at least one must generate text.
    with grpc.insecure_channel(status["gateway"]) as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        answers = [list(stub.Generate(generate_pb2.GenerateRequest(
            model="fortune", prompt="A fortune for you:", max_new_tokens=16,
            temperature=0.8, top_p=0.95, seed=seed), timeout=60)) for seed in (1, 2, 3)]
    assert all(pieces[-1].finish_reason in ("length", "eos") for pieces in answers)
    assert max(pieces[-1].completion_tokens for pieces in answers) >= 1

    # The same model through the OpenAI SDK and through tritonclient, unchanged.
    client = openai.OpenAI(base_url=status["openai_base_url"], api_key="unused", max_retries=0)
    completion = client.completions.create(model="fortune", prompt="Hello", max_tokens=8)
    assert completion.usage.completion_tokens >= 1
    triton_client = triton.InferenceServerClient(status["gateway"])
    assert triton_client.is_model_ready("fortune")
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"Hello"], dtype=np.object_))
    assert triton_client.infer("fortune", [text]).as_numpy("text_output")[0]

    gen = lmforge(env, "generate", "--model", "fortune", "--seed", "2", "Hello")
    assert gen.stdout.startswith("Hello")

    # The training passages nearest a sentence of the corpus, from the model's index.
    found = json.loads(lmforge(env, "search", "fortune",
                               "A day for firm decisions!!!!!  Or is it?", "-k", "3",
                               "--json").stdout)
    assert found and found[0]["score"] > 0.5 and "firm decisions" in found[0]["text"]

    runs = json.loads(lmforge(env, "runs", "--json").stdout)
    (mine,) = [r for r in runs if r["run_id"] == "e2e-run"]
    assert mine["status"] == "served" and mine["perplexity"] > 1

    # Every service was scraped by a real Prometheus through the supervisor's target file,
    # on the ports `status --json` lists, and the headline PromQL answers.
    listed = {url.removeprefix("http://").removesuffix("/metrics"): name
              for name, service in status["services"].items()
              for url in service["metrics_urls"]}
    assert set(listed.values()) == SEVEN
    scraped = {t["labels"]["instance"]: t for t in prometheus.targets()}
    assert set(listed) <= set(scraped), (listed, scraped)
    assert all(scraped[i]["health"] == "up" for i in listed), scraped
    # rate() needs the counter to move between two scrapes of it: on a loaded machine a
    # scrape can first see the OK series after every request above was answered, and
    # the error ratio is then 0/0. More requests once Prometheus holds the series.
    assert_promql_answers(prometheus, {
        "OK series": 'sum(lmforge_gateway_requests_total{code="OK"})'})
    with grpc.insecure_channel(status["gateway"]) as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        for seed in (4, 5):
            list(stub.Generate(generate_pb2.GenerateRequest(
                model="fortune", prompt="Hello", max_new_tokens=2, seed=seed), timeout=60))
            time.sleep(1.5)  # past a scrape interval
    assert_promql_answers(prometheus, {
        "QPS": "sum(rate(lmforge_gateway_requests_total[5m]))",
        "P99 latency": "histogram_quantile(0.99, sum by (le) "
                       "(rate(lmforge_gateway_request_seconds_bucket[5m])))",
        "tokens/s": 'max(max_over_time(lmforge_trainer_tokens_per_second{run_id="e2e-run"}[30m]))',
        "perplexity": 'lmforge_trainer_heldout_perplexity{run_id="e2e-run"}',
        "quantized perplexity": 'lmforge_quantizer_perplexity{model="fortune",method="fp"}',
    })
    # Every panel of every shipped dashboard answers after the run.
    panels = {f"{board.stem}/{panel['title']}/{target['refId']}": target["expr"]
              for board in sorted(DASHBOARDS.glob("*.json"))
              for panel in json.loads(board.read_text())["panels"]
              for target in panel["targets"]}
    assert len(panels) >= 30
    assert_promql_answers(prometheus, panels)

    # The run's report: one page, every section drawn from this run.
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    report_path = ARTIFACTS / "e2e-run-report.html"
    lmforge(env, "report", "e2e-run", "--out", str(report_path))
    page = report_path.read_text()
    assert page.count("data:image/png;base64,") == 6  # all but the quantization table
    assert "<td>full precision</td>" in page and 'class="none"' not in page
    record = json.loads(lmforge(env, "report", "e2e-run", "--json").stdout)
    assert record["status"] == "served" and record["latency"]["p99"] > 0
    assert record["cost"]["charges"] and record["heldout"][0][1] > 1

    # The same bytes under another path and a new run id: every stage replays its
    # earlier outputs (the stage cache), none runs, nothing new is stored.
    stored = set((tmp_home(env) / "artifacts" / "sha256").iterdir())
    copy = tmp_home(env).parent / "data" / "copied.txt"
    copy.parent.mkdir(exist_ok=True)
    shutil.copy(TEST_DATA / "fortunes-sample.txt", copy)
    again = lmforge(env, "run", str(copy), "--model-name", "fortune", "--run-id", "e2e-again",
                    "--follow", "--timeout", "120")
    assert "served as model fortune" in again.stderr
    assert "5 stage(s) reused the outputs of run e2e-run" in again.stderr, again.stderr
    events = asyncio.run(run_events(status["nats_url"], "e2e-again", tmp_home(env)))
    outputs = {subject: headers for subject, headers in events if subject in STAGE_OUTPUTS}
    assert set(outputs) == STAGE_OUTPUTS, sorted(subject for subject, _ in events)
    assert all(h.get("Lmforge-Cached-From") == "e2e-run" for h in outputs.values()), outputs
    assert not [s for s, _ in events if s == "lmforge.training.progress"]
    assert set((tmp_home(env) / "artifacts" / "sha256").iterdir()) == stored

    # A service killed with -9 is restarted by the supervisor.
    victim = status["services"]["quantizer"]["pids"][0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = json.loads(lmforge(env, "status", "--json").stdout)["services"]["quantizer"]
        if now["restarts"] == 1 and now["state"] == "running" and now["pids"] != [victim]:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"quantizer not restarted: {now}")

    # An SRE pin reaches the supervisor through the autoscaler's decision.
    lmforge(env, "scale", "data-prep=2")
    wait_for_service(env, "data-prep", lambda s: s["replicas"] == 2 and s["pinned"])
    lmforge(env, "scale", "data-prep=auto")
    wait_for_service(env, "data-prep", lambda s: s["replicas"] == 1 and not s["pinned"])
    bad = lmforge(env, "scale", "ghost=3", check=False)
    assert bad.returncode == 2 and "ghost=3" in bad.stderr

    lmforge(env, "down", timeout=120)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        traces = {}
        for span in receiver.spans:
            if span["attributes"].get("lmforge.run_id") == "e2e-run":
                traces.setdefault(span["trace_id"], set()).add(span["service"])
        if any(services >= SEVEN for services in traces.values()):
            break
        time.sleep(0.5)
    assert len(traces) == 1, traces
    assert next(iter(traces.values())) >= SEVEN
