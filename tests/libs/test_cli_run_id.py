"""`lmforge run`'s default run id changes when the data does, for a directory too."""

from __future__ import annotations

import os

from lmforge.cli.main import default_run_id


def test_a_changed_or_added_file_in_a_directory_makes_a_new_run_id(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    first = default_run_id(str(tmp_path), "m")
    assert default_run_id(str(tmp_path), "m") == first
    (tmp_path / "b.txt").write_text("two")
    added = default_run_id(str(tmp_path), "m")
    assert added != first
    os.utime(tmp_path / "a.txt", ns=(1, 1))
    assert default_run_id(str(tmp_path), "m") != added
    assert default_run_id(str(tmp_path / "*.txt"), "m") != default_run_id(str(tmp_path), "m")


def test_two_tenants_training_the_same_data_and_name_get_two_run_ids(tmp_path):
    """A run id is the tenant's that used it first: the same URL and model name must not
    make acme's and globex's runs one (the second would fail). Untenanted: as before."""
    from lmforge.cli.main import dataset_ready_msg_id

    (tmp_path / "a.txt").write_text("one")
    for spec in (str(tmp_path), "s3://shared/corpus/"):
        ids = {tenant: default_run_id(spec, "m", tenant) for tenant in ("", "acme", "globex")}
        assert len(set(ids.values())) == 3
        assert ids["acme"] == default_run_id(spec, "m", "acme")  # re-running is a no-op
        assert ids[""] == default_run_id(spec, "m")
    assert default_run_id("s3://shared/corpus/", "m") == "m-b02372816742"  # as before
    # the stream's dedupe id: one tenant's repeat is dropped, another tenant's never
    assert dataset_ready_msg_id("r1", "acme") != dataset_ready_msg_id("r1", "globex")
    assert dataset_ready_msg_id("r1", "") == "r1:dataset.ready"
