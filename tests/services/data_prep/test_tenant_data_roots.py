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
