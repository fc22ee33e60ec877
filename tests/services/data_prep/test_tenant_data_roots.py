"""Per-tenant data roots (LMFORGE_TENANT_DATA_ROOTS): a run reads only its own tenant's.

The tenant is the one NATS vouched for (the subject token of dataset.ready, see
tests/libs/test_tenant_subjects.py), so acme cannot point data-prep at globex's files by
naming them, and a tenant the setting does not list reads nothing.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.settings import PlatformSettings, TenantWithoutRoots
from services.data_prep.handlers import DataPrepService
from tests.conftest import TEST_DATA


def test_the_setting_lists_each_tenants_roots(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LMFORGE_TENANT_DATA_ROOTS",
                       f"acme={tmp_path}/acme,{tmp_path}/shared,globex=s3://g/exports/")
    settings = PlatformSettings(data_roots=[str(tmp_path / "open")])
    assert settings.data_roots_for("acme") == [str(tmp_path / "acme"), str(tmp_path / "shared")]
    assert settings.data_roots_for("globex") == ["s3://g/exports/"]
    assert settings.data_roots_for("") == [str(tmp_path / "open")]  # an untenanted run
    with pytest.raises(TenantWithoutRoots, match=r"tenant 'initech' has no data roots.*"
                                                 r"lists acme, globex; add initech=/path"):
        settings.data_roots_for("initech")


def test_without_the_setting_every_tenant_reads_the_shared_roots(tmp_path: Path) -> None:
    settings = PlatformSettings(data_roots=[str(tmp_path)])
    assert settings.data_roots_for("acme") == [str(tmp_path)]


@pytest.mark.parametrize("value, reason", [
    ("/data/x,acme=/data/acme", "comes before any `tenant=`"),
    ("acme=/a,acme=/b", "listed twice"),
    ("Acme Corp=/a", "is not a tenant name"),
    ("acme=", "have no data roots"),
])
def test_a_malformed_setting_is_refused_with_the_reason(value: str, reason: str,
                                                        monkeypatch) -> None:
    monkeypatch.setenv("LMFORGE_TENANT_DATA_ROOTS", value)
    with pytest.raises(ValidationError, match=reason):
        PlatformSettings()


def test_a_run_reads_only_its_own_tenants_roots(tmp_path: Path) -> None:
    acme, globex = tmp_path / "acme", tmp_path / "globex"
    for root in (acme, globex):
        root.mkdir()
        shutil.copy(TEST_DATA / "fortunes-sample.txt", root / "corpus.txt")

    def ready(run_id: str, tenant: str, path: Path) -> ev.DatasetReady:
        return ev.DatasetReady(run_id=run_id, dataset_uri=str(path), format="text",
                               model_name="m", tenant=tenant)

    async def scenario() -> tuple[list[ev.DatasetPrepared], dict[str, str]]:
        from tests.buses import MemoryHarness

        harness = MemoryHarness()
        async with harness.service(DataPrepService, home=tmp_path / "home",
                                   data_roots=[tmp_path],
                                   tenant_data_roots={"acme": [str(acme)],
                                                      "globex": [str(globex)]},
                                   dataprep_vocab_size=512, dataprep_semantic=False):
            await harness.publish(ready("steal", "acme", globex / "corpus.txt"), "steal")
            await harness.publish(ready("unlisted", "initech", acme / "corpus.txt"),
                                  "unlisted")
            await harness.publish(ready("own", "acme", acme / "corpus.txt"), "own")
            failed = await harness.wait_for(subjects.STAGE_FAILED, 2)
            prepared = await harness.wait_for(subjects.DATASET_PREPARED, 1)
        return prepared, {f.run_id: f.reason for f in failed}

    prepared, failed = asyncio.run(scenario())
    assert [p.run_id for p in prepared] == ["own"]
    assert "outside the allowed roots" in failed["steal"]
    assert f"LMFORGE_TENANT_DATA_ROOTS[acme]={acme}" in failed["steal"]
    assert "tenant 'initech' has no data roots" in failed["unlisted"]


def test_a_model_name_shared_by_two_tenants_is_not_deduplicated_across_them(tmp_path: Path
                                                                           ) -> None:
    """Near-dup against earlier runs keys the model's last dataset by tenant: globex's run of
    model 'm' is not compared with acme's data (it would learn what acme trained on)."""
    import json

    from tests.buses import MemoryHarness

    root = tmp_path / "data"
    root.mkdir()
    texts = [f"Record {i}: the quarterly report for region {i} shows steady growth in sales "
             f"and a modest rise in support tickets, mostly about billing {i}."
             for i in range(40)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    def ready(run_id: str, tenant: str) -> ev.DatasetReady:
        return ev.DatasetReady(run_id=run_id, model_name="m", format="", tenant=tenant,
                               dataset_uri=str(root / "corpus.jsonl"))

    async def scenario() -> tuple[dict[str, ev.DatasetPrepared], list[dict[str, str]], str]:
        harness = MemoryHarness()
        async with harness.service(DataPrepService, home=tmp_path / "home", data_roots=[root],
                                   dataprep_vocab_size=300, dataprep_seq_len=32,
                                   dataprep_near_dup_earlier_runs=True, dataprep_semantic=False,
                                   dataprep_near_dup_threshold=0.5):
            found = {}
            for run_id, tenant in (("acme-1", "acme"), ("globex-1", "globex")):
                await harness.publish(ready(run_id, tenant), run_id)
                (found[run_id],) = await harness.wait_for(subjects.DATASET_PREPARED, 1,
                                                          run_id=run_id)
            headers = await harness.headers(subjects.DATASET_PREPARED, "globex-1")
            # the same tenant's next run of the same data is deduplicated to nothing
            await harness.publish(ready("acme-2", "acme"), "acme-2")
            (failed,) = await harness.wait_for(subjects.STAGE_FAILED, 1, run_id="acme-2")
        return found, headers, failed.reason

    found, headers, acme_again = asyncio.run(scenario())
    assert "near_dup.seen_before" not in found["globex-1"].stats.dropped
    assert found["globex-1"].stats.records_kept == 40
    # nor is acme's prepared dataset replayed for globex from the stage cache
    assert [h.get("Lmforge-Cached-From", "") for h in headers] == [""]
    assert "40 near_dup.seen_before" in acme_again
