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
