"""The contract: generated code is fresh, the catalog is one subject per type."""

from __future__ import annotations

import filecmp

from lmforge.contracts import codegen, subjects

ISSUE_SUBJECTS = {
    "lmforge.dataset.ready": "DatasetReady",
    "lmforge.dataset.prepared": "DatasetPrepared",
    "lmforge.training.scheduled": "TrainingScheduled",
    "lmforge.training.progress": "TrainingProgress",
    "lmforge.training.checkpointed": "TrainingCheckpointed",
    "lmforge.training.preempted": "TrainingPreempted",
    "lmforge.model.trained": "ModelTrained",
    "lmforge.model.quantized": "ModelQuantized",
    "lmforge.model.exported": "ModelExported",
    "lmforge.model.deployed": "ModelDeployed",
    "lmforge.stage.failed": "StageFailed",
    "lmforge.scaling.decided": "ScalingDecided",
}


def test_generated_code_is_not_stale(tmp_path):
    codegen.generate(tmp_path)
    committed = codegen.OUTPUT_DIR
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(p.name for p in committed.iterdir() if p.is_file())
    stale = [n for n in names if not filecmp.cmp(tmp_path / n, committed / n, shallow=False)]
    assert not stale, f"run `make proto`: {stale} differ from proto/lmforge/v1"


def test_catalog_matches_the_public_contract():
    assert {s.name: s.message.__name__ for s in subjects.ALL} == ISSUE_SUBJECTS
    for subject in subjects.ALL:
        assert "run_id" in subject.message.DESCRIPTOR.fields_by_name, subject.name
        assert subjects.for_message(subject.message()) is subject
        assert subjects.by_name(subject.name) is subject
