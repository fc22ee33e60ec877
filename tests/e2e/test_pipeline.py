"""The whole system through the CLI: up, run --follow, Generate, one trace, restarts, down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import openai
import pytest
import tritonclient.grpc as triton

from lmforge.contracts.v1 import generate_pb2, generate_pb2_grpc
from tests.conftest import TEST_DATA
from tests.otlp_receiver import OtlpTraceReceiver

pytestmark = pytest.mark.e2e

SEVEN = {"data-prep", "scheduler", "trainer", "quantizer", "exporter", "inference-gateway",
         "cost-autoscaler"}


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
        "LMFORGE_DATA_ROOTS": str(TEST_DATA),
        "LMFORGE_DATAPREP_VOCAB_SIZE": "1024",
        "LMFORGE_DATAPREP_SEQ_LEN": "64",
        "LMFORGE_SCHEDULER_TIME_BUDGET_S": "8",
        "LMFORGE_AUTOSCALER_INTERVAL_S": "1",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    lmforge(env, "up", "-d", "--gateway-port", "0")
    try:
        yield env, receiver
    finally:
        lmforge(env, "down", timeout=120, check=False)
        receiver.stop()


def test_a_run_goes_from_text_to_a_served_model_in_one_trace(system):
    env, receiver = system
    status = json.loads(lmforge(env, "status", "--json").stdout)
    assert set(status["services"]) == SEVEN
    assert all(s["state"] == "running" and s["replicas"] == 1
               for s in status["services"].values())
    assert status["nats_url"].startswith("nats://127.0.0.1:")

    run = lmforge(env, "run", str(TEST_DATA / "fortunes-sample.txt"), "--model-name",
                  "fortune", "--run-id", "e2e-run", "--follow", "--timeout", "600",
                  timeout=660)
    assert "served as model fortune" in run.stderr

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

    runs = json.loads(lmforge(env, "runs", "--json").stdout)
    (mine,) = [r for r in runs if r["run_id"] == "e2e-run"]
    assert mine["status"] == "served" and mine["perplexity"] > 1

    # Re-running the same data under the same run id is a no-op: nothing is redone.
    again = lmforge(env, "run", str(TEST_DATA / "fortunes-sample.txt"), "--model-name",
                    "fortune", "--run-id", "e2e-run", "--follow", "--timeout", "60")
    assert "served as model fortune" in again.stderr

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
