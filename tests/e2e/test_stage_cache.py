"""The stage cache across the pipeline, on the in-memory bus.

data-prep, scheduler, trainer, quantizer and exporter run their real handlers
(a tiny model trained for a few steps, a real ONNX export). A second run on a
touched copy of the data under a new run id must run no stage; a run on data
with one changed byte must run every stage again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

import pytest

from lmforge.contracts import subjects
from lmforge.contracts.names import Header
from lmforge.contracts.v1 import events_pb2 as ev
from services.data_prep.handlers import DataPrepService
from services.exporter.handlers import ExporterService
from services.quantizer.handlers import QuantizerService
from services.scheduler.handlers import SchedulerService
from services.trainer.handlers import TrainerService
from tests.buses import MemoryHarness
from tests.conftest import TEST_DATA

pytestmark = pytest.mark.e2e

STAGE_OUTPUTS = (subjects.DATASET_PREPARED, subjects.TRAINING_SCHEDULED,
                 subjects.MODEL_TRAINED, subjects.MODEL_QUANTIZED, subjects.MODEL_EXPORTED)


def _artifacts(home: Path) -> set[str]:
    return {p.name for p in (home / "artifacts" / "sha256").iterdir()}


def test_unchanged_data_runs_no_stage_and_one_changed_byte_runs_them_all(tmp_path):
    data, home = tmp_path / "data", tmp_path / "home"
    data.mkdir()
    corpus = data / "corpus.txt"
    shutil.copy(TEST_DATA / "fortunes-sample.txt", corpus)
    harness = MemoryHarness()
    settings = dict(home=home, data_roots=[data], dataprep_vocab_size=512,
                    dataprep_seq_len=32, scheduler_time_budget_s=2.0,
                    scheduler_global_batch=4, dataprep_semantic=False)

    async def run(run_id: str, path: Path) -> dict[str, dict[str, str]]:
        await harness.publish(ev.DatasetReady(run_id=run_id, dataset_uri=str(path),
                                              format="text", model_name="cached"), run_id)
        await harness.wait_for(subjects.MODEL_EXPORTED, 1, run_id=run_id, timeout=600)
        return {s.name: (await harness.headers(s, run_id))[0] for s in STAGE_OUTPUTS}

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            for service in (DataPrepService, SchedulerService, TrainerService,
                            QuantizerService, ExporterService):
                await stack.enter_async_context(harness.service(service, **settings))
            first = await run("first", corpus)
            stored = _artifacts(home)
            copy = data / "copy" / "corpus.txt"
            copy.parent.mkdir()
            shutil.copy(corpus, copy)
            os.utime(copy)
            again = await run("again", copy)
            assert _artifacts(home) == stored, "an unchanged run stored new artifacts"
            with corpus.open("r+b") as f:
                f.seek(200)
                f.write(b"#")
            changed = await run("changed", corpus)
            progress = {r: len(harness.broker.events(subjects.TRAINING_PROGRESS, run_id=r))
                        for r in ("first", "again", "changed")}
            exported = {r: harness.broker.events(subjects.MODEL_EXPORTED, run_id=r)[0]
                        for r in ("first", "again", "changed")}
            return first, again, changed, progress, exported

    first, again, changed, progress, exported = asyncio.run(scenario())
    assert not any(Header.CACHED_FROM in h for h in first.values())
    assert {name: h.get(Header.CACHED_FROM) for name, h in again.items()} == {
        s.name: "first" for s in STAGE_OUTPUTS}
    assert not any(Header.CACHED_FROM in h for h in changed.values())
    assert progress["again"] == 0 and progress["first"] > 0 and progress["changed"] > 0
    assert exported["again"].export.digest == exported["first"].export.digest
    assert exported["changed"].export.digest != exported["first"].export.digest
