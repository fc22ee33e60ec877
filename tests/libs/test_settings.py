from __future__ import annotations

import os
import subprocess
import sys


def test_bad_setting_stops_a_service_with_one_clear_line(tmp_path):
    env = {**os.environ, "LMFORGE_MAX_DELIVER": "zero", "LMFORGE_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "services.scheduler"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "invalid settings: LMFORGE_MAX_DELIVER='zero': "
        "Input should be a valid integer, unable to parse string as an integer"
    ]


def test_data_roots_split_on_pathsep_and_commas(monkeypatch, tmp_path):
    from lmforge.settings import PlatformSettings

    monkeypatch.setenv("LMFORGE_DATA_ROOTS", f"{tmp_path}/a{os.pathsep}{tmp_path}/b,/srv")
    roots = PlatformSettings().data_roots
    assert [str(r) for r in roots] == [f"{tmp_path}/a", f"{tmp_path}/b", "/srv"]
