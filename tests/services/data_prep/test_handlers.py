"""data-prep on a real bus: bad input fails the run once, duplicates make one run."""

from __future__ import annotations

import asyncio

import pytest

from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from services.data_prep.handlers import DataPrepService
from tests.conftest import TEST_DATA
from tests.helpers import count_events, in_process_service, publish, wait_for_events

pytestmark = pytest.mark.connected


def _ready(run_id: str, uri: str, fmt: str = "text") -> ev.DatasetReady:
    return ev.DatasetReady(run_id=run_id, dataset_uri=uri, format=fmt, model_name="m")


def test_bad_dataset_requests_fail_with_the_path_and_the_rule(nats_server, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "sub").mkdir()
    cases = {
        "outside": ("/etc/passwd", "outside the allowed roots"),
        "missing": (str(tmp_path / "nope.jsonl"), "does not exist"),
        "notfile": (str(tmp_path / "sub"), "is not a regular file"),
        "empty": (str(tmp_path / "empty.txt"), "no usable documents"),
        "format": (str(tmp_path / "empty.txt"), "format 'parquet' is not supported"),
    }

    async def scenario():
        async with in_process_service(DataPrepService, nats_server.url, home=tmp_path / "home",
                                      data_roots=[tmp_path]):
            for run_id, (uri, _) in cases.items():
                fmt = "parquet" if run_id == "format" else "text"
                await publish(nats_server.url, _ready(run_id, uri, fmt), msg_id=run_id)
            failed = await wait_for_events(nats_server.url, subjects.STAGE_FAILED, len(cases))
            await asyncio.sleep(0.3)
            assert await count_events(nats_server.url, subjects.DATASET_PREPARED) == 0
        return {f.run_id: f for f in failed}

    failed = asyncio.run(scenario())
    for run_id, (_uri, rule) in cases.items():
        assert rule in failed[run_id].reason, failed[run_id].reason
        assert failed[run_id].stage == "data-prep" and not failed[run_id].dead_lettered
    assert "'/etc/passwd'" in failed["outside"].reason


def test_same_dataset_ready_twice_is_one_run(nats_server, tmp_path):
    event = _ready("twice", str(TEST_DATA / "fortunes-sample.txt"))

    async def scenario():
        async with in_process_service(DataPrepService, nats_server.url, home=tmp_path / "home",
                                      data_roots=[TEST_DATA], dataprep_vocab_size=512):
            await publish(nats_server.url, event, msg_id="twice:dataset.ready")
            await publish(nats_server.url, event, msg_id="twice:dataset.ready")
            (prepared,) = await wait_for_events(nats_server.url, subjects.DATASET_PREPARED, 1)
            # Outside the dedup window a republish carries a new msg id: still one run.
            await publish(nats_server.url, event, msg_id="twice:dataset.ready:later")
            await asyncio.sleep(1.0)
            assert await count_events(nats_server.url, subjects.DATASET_PREPARED) == 1
        return prepared

    prepared = asyncio.run(scenario())
    assert prepared.stats.records_read == 1429
    assert prepared.stats.train_tokens > 10_000
    assert prepared.dataset.digest.startswith("sha256:")
