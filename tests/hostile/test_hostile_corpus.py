"""The hostile-input corpus: every case in tests/hostile/cases/*.json, one test each.

Each case is sent the way an attacker or a broken client would send it — HTTP
bodies and trickles to the OpenAI endpoint, raw gRPC frames to Generate, events
on dataset.ready (in-process, on the in-memory bus, through the real dispatcher
and data-prep handlers), dataset files to data-prep's reader, environment values
to the settings loader — and must get:
- a clear error naming the reason (the case's `reason`/`error`/`dropped` text);
- a service that stays healthy: the same server or consumer answers the next,
  ordinary request;
- a count in the metrics: `lmforge_gateway_requests_total` by code, the consumed
  events by outcome, data-prep's decision log by reason. (Settings are refused
  at start-up, before any metric exists: one line and exit 2.)

No child processes: the servers run in this event loop, so the corpus is fast.
A tenant-mismatch event case is pending the tenants of issue 13 part A
(branch `security`).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from prometheus_client import REGISTRY

from lmforge.contracts import subjects
from lmforge.contracts.names import Header
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.contracts.v1 import generate_pb2
from lmforge.settings import ServiceSettings, load_settings
from services.data_prep.documents import DecisionLog
from services.data_prep.handlers import DataPrepService
from services.data_prep.sources import DatasetInputError, ReadConfig, iter_documents
from services.inference_gateway.api.openai import OpenAIServer
from services.inference_gateway.frontend import GenerationFrontend, Limits
from services.inference_gateway.registry import ModelRegistry
from services.inference_gateway.settings import GatewaySettings
from tests.buses import MemoryHarness
from tests.helpers import start_gateway

CASES_DIR = Path(__file__).parent / "cases"
CATEGORIES = ("http", "grpc", "events", "datasets", "settings")


def _load() -> list[Any]:
    params = []
    for category in CATEGORIES:
        for case in json.loads((CASES_DIR / f"{category}.json").read_text()):
            params.append(pytest.param(category, case, id=case["id"]))
    return params


CASES = _load()


def test_the_corpus_has_at_least_sixty_distinct_cases() -> None:
    ids = [p.id for p in CASES]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)


@pytest.mark.parametrize(("category", "case"), CASES)
def test_hostile_input_gets_a_clear_error_and_leaves_the_service_healthy(
        category: str, case: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    if category == "http":
        asyncio.run(_http_case(case))
    elif category == "grpc":
        asyncio.run(_grpc_case(case))
    elif category == "events":
        asyncio.run(_event_case(case, tmp_path))
    elif category == "datasets":
        _dataset_case(case, tmp_path)
    else:
        _settings_case(case, monkeypatch, capsys)


# -- gateway: HTTP and gRPC -------------------------------------------------------------

def _requests_counted(protocol: str, code: str) -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name != "lmforge_gateway_requests":
            continue
        for sample in metric.samples:
            if (sample.name.endswith("_total") and sample.labels.get("protocol") == protocol
                    and sample.labels.get("code") == code):
                total += sample.value
    return total


HTTP_CODES = {400: "INVALID_ARGUMENT", 408: "DEADLINE_EXCEEDED", 413: "RESOURCE_EXHAUSTED"}


def _http_payload(case: dict[str, Any]) -> bytes:
    if "raw" in case:
        return str(case["raw"]).encode()
    if "raw_hex" in case:
        return bytes.fromhex(case["raw_hex"])
    body = dict(case["body"]) if isinstance(case["body"], dict) else case["body"]
    if "stop_count" in case:
        body["stop"] = [f"s{i}" for i in range(case["stop_count"])]
    if "pad_prompt_bytes" in case:
        body["prompt"] = "x" * case["pad_prompt_bytes"]
    return json.dumps(body).encode()


async def _trickle(port: int, path: str) -> tuple[int, str]:
    """Headers promising 200 bytes, then one byte every 0.2 s (slowloris)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: 200\r\n\r\n{{".encode())
    await writer.drain()
    try:
        for _ in range(50):
            try:
                answer = await asyncio.wait_for(reader.read(65536), 0.2)
            except TimeoutError:
                writer.write(b" ")
                await writer.drain()
                continue
            head, _, body = answer.decode(errors="replace").partition("\r\n\r\n")
            return int(head.split()[1]), body
        raise AssertionError("the server waited 10 s for a trickled body")
    finally:
        writer.close()


async def _http_case(case: dict[str, Any]) -> None:
    frontend = GenerationFrontend(ModelRegistry(), Limits(
        max_new_tokens=64, max_concurrency=2, max_queue=4, max_prompt_chars=100_000))
    server = OpenAIServer(frontend, host="127.0.0.1", port=0, max_body_bytes=1 << 20,
                          body_timeout_s=1.0)
    port = await server.start()
    path = case.get("path", "/v1/completions")
    code = HTTP_CODES[case["status"]]
    before = _requests_counted("openai", code)
    try:
        async with aiohttp.ClientSession() as session:
            if case.get("trickle"):
                status, text = await _trickle(port, path)
            else:
                async with session.post(f"http://127.0.0.1:{port}{path}",
                                        data=_http_payload(case),
                                        headers={"Content-Type": "application/json"}) as r:
                    status, text = r.status, await r.text()
            assert status == case["status"], text
            assert case["reason"] in json.loads(text)["error"]["message"], text
            # Healthy: the next ordinary request is answered (404: no model is loaded).
            async with session.post(f"http://127.0.0.1:{port}/v1/completions",
                                    json={"model": "m", "prompt": "hi"}) as r:
                assert r.status == 404, await r.text()
            async with session.get(f"http://127.0.0.1:{port}/v1/models") as r:
                assert r.status == 200
        assert _requests_counted("openai", code) == before + 1
    finally:
        await server.stop()


def _grpc_payload(case: dict[str, Any]) -> bytes:
    if "raw_hex" in case:
        return bytes.fromhex(case["raw_hex"])
    fields = {k: (float(v) if isinstance(v, str) and k in ("temperature", "top_p") else v)
              for k, v in case["request"].items()}
    request = generate_pb2.GenerateRequest(**fields)
    if "stop_count" in case:
        request.stop.extend(f"s{i}" for i in range(case["stop_count"]))
    if "prompt_chars" in case:
        request.prompt = "x" * case["prompt_chars"]
    return request.SerializeToString()


async def _grpc_case(case: dict[str, Any]) -> None:
    server = await start_gateway(ModelRegistry(), serving=True, max_prompt_chars=1000,
                                 max_message_bytes=1 << 20)
    before = _requests_counted("native", case["code"])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            generate = channel.unary_stream(
                "/lmforge.v1.Generator/Generate", request_serializer=lambda b: b,
                response_deserializer=generate_pb2.GenerateResponse.FromString)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in generate(_grpc_payload(case), timeout=10):
                    pass
            assert raised.value.code().name == case["code"], raised.value.details()
            assert case["reason"] in (raised.value.details() or ""), raised.value.details()
            # Healthy: an ordinary request is answered NOT_FOUND (no model loaded).
            with pytest.raises(grpc.aio.AioRpcError) as again:
                async for _ in generate(generate_pb2.GenerateRequest(
                        model="m", prompt="hi").SerializeToString(), timeout=10):
                    pass
            assert again.value.code() == grpc.StatusCode.NOT_FOUND
        assert _requests_counted("native", case["code"]) == before + 1
    finally:
        await server.stop()


# -- events -----------------------------------------------------------------------------

def _consumed(outcome: str) -> float:
    return REGISTRY.get_sample_value("lmforge_events_consumed_total", {
        "subject": subjects.DATASET_READY.name, "outcome": outcome}) or 0.0


def _event_payload(case: dict[str, Any]) -> tuple[bytes, str]:
    """The payload bytes and the run id the case carries."""
    if "raw_hex" in case:
        return bytes.fromhex(case["raw_hex"]), ""
    fields = dict(case["fields"])
    if "run_id_chars" in case:
        fields["run_id"] = "r" * case["run_id_chars"]
    if "uri_chars" in case:
        fields["dataset_uri"] = "d" * case["uri_chars"]
    message_type = getattr(ev, case.get("other_type", "DatasetReady"))
    return message_type(**fields).SerializeToString(), str(fields.get("run_id", ""))


async def _event_case(case: dict[str, Any], tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    data_root.mkdir()
    (data_root / "corpus.txt").write_text("a small corpus\n")
    harness = MemoryHarness()
    payload, run_id = _event_payload(case)
    outcome = "dead_lettered" if case["outcome"] == "dead_letter" else "failed"
    before = _consumed(outcome)
    async with harness.service(DataPrepService, home=tmp_path / "home",
                               data_roots=[str(data_root)]):
        headers = {Header.MSG_ID: f"hostile-{case['id']}", Header.RUN_ID: run_id,
                   **case.get("headers", {})}
        # on the untenanted subject: a body naming a tenant there is a tenant mismatch
        await harness.publish_raw(subjects.DATASET_READY.for_tenant(""), payload, headers)
        (failed,) = await harness.wait_for(subjects.STAGE_FAILED, 1, timeout=60)
        assert case["reason"] in failed.reason, failed.reason[:300]
        assert len(failed.reason) < 2100 and len(failed.run_id) < 260, len(failed.reason)
        dead = await harness.dead_letters("data-prep")
        if case["outcome"] == "dead_letter":
            assert failed.dead_lettered and len(dead) == 1, failed
            assert case["reason"] in dead[0][1][Header.FAILURE_REASON]
        else:
            assert not failed.dead_lettered and not dead, failed
        # Healthy: the consumer takes the next event (a missing file: failed, said so).
        await harness.publish(ev.DatasetReady(run_id="next", dataset_uri=str(
            data_root / "missing.txt"), model_name="m"), "hostile-next")
        (after,) = await harness.wait_for(subjects.STAGE_FAILED, 1, run_id="next",
                                          timeout=60)
        assert "does not exist" in after.reason
    assert _consumed(outcome) >= before + 1


# -- dataset files ------------------------------------------------------------------------

def _build_dataset(case: dict[str, Any], root: Path) -> Path:
    path = root / case["name"]
    build = case["build"]
    if build == "gzip_bomb":
        with gzip.open(path, "wb", compresslevel=6) as f:
            chunk = bytes.fromhex(case.get("fill", "61")) * (1 << 20)
            for _ in range(case["expanded_bytes"] >> 20):
                f.write(chunk)
    elif build == "zstd_bomb":
        import zstandard

        with path.open("wb") as raw, zstandard.ZstdCompressor(level=19).stream_writer(
                raw) as f:
            chunk = b"a" * (1 << 20)
            for _ in range(case["expanded_bytes"] >> 20):
                f.write(chunk)
    elif build == "truncated_gzip":
        whole = gzip.compress(("a fine line of text\n" * 5000).encode())
        path.write_bytes(whole[: len(whole) // 2])
    elif build == "bytes":
        data = bytes.fromhex(case["hex"]) if "hex" in case else case["text"].encode()
        lead = (case.get("good_line", "") + "\n") * case.get("good_lines", 0)
        path.write_bytes(lead.encode() + data * case.get("repeat", 1))
    elif build == "symlink":
        path.symlink_to(case["target"])
    elif build == "fifo":
        os.mkfifo(path)
    elif build == "changing":  # appended to once the reader is in it (below)
        path.write_text("".join(f"record {i} of a file another process writes to\n\n"
                                for i in range(20000)))
    return path


def _dataset_case(case: dict[str, Any], tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    path = _build_dataset(case, root)
    log = DecisionLog()
    expected = case.get("error") or case.get("dropped") or ""
    count = 0
    try:
        for _ in iter_documents(str(path), roots=[root], log=log, config=ReadConfig(),
                                spool_dir=tmp_path / "spool"):
            count += 1
            if count == 1 and case["build"] == "changing":
                with path.open("a") as writer:
                    writer.write("a record written while the file was being read\n\n")
    except DatasetInputError as exc:
        error = str(exc)
        wanted = case.get("error_or_dropped") or [case.get("error")]
        assert any(w and w in error for w in wanted), error
    else:
        reasons = {reason for (_stage, reason) in log.counts}
        if "error_or_dropped" in case:
            assert reasons & set(case["error_or_dropped"]), (count, log.counts)
        else:
            assert "error" not in case, f"read {count} documents; wanted: {expected}"
            assert case["dropped"] in reasons, (count, log.counts)
    # Healthy: the same reader takes an ordinary file next.
    fine = root / "fine.txt"
    fine.write_text("an ordinary line\n")
    assert [d.text for d in iter_documents(str(fine), roots=[root], log=DecisionLog(),
                                           config=ReadConfig())] == ["an ordinary line\n"]


# -- settings -----------------------------------------------------------------------------

def _settings_case(case: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    settings_type = GatewaySettings if case["settings"] == "gateway" else ServiceSettings
    for name, value in case["env"].items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        load_settings(settings_type)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("invalid settings: ") and "\n" not in err, err
    assert case["reason"] in err, err
    for name in case["env"]:
        monkeypatch.delenv(name)
    assert load_settings(settings_type) is not None  # the defaults still load
