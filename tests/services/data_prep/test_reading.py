from __future__ import annotations

import pytest

from services.data_prep.reading import (
    DatasetInputError,
    ReadStats,
    read_documents,
    resolve_dataset_path,
)


def test_paths_outside_roots_missing_or_not_files_are_refused(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "ok.txt").write_text("hello")
    (root / "dir").mkdir()
    (root / "escape.txt").symlink_to("/etc/passwd")
    roots = [root]
    assert resolve_dataset_path(str(root / "ok.txt"), roots) == root / "ok.txt"
    assert resolve_dataset_path((root / "ok.txt").as_uri(), roots) == root / "ok.txt"
    cases = {
        "/etc/passwd": "outside the allowed roots (LMFORGE_DATA_ROOTS=",
        str(root / "escape.txt"): "outside the allowed roots",
        str(root / "../data/../../etc/passwd"): "outside the allowed roots",
        str(root / "missing.txt"): "does not exist",
        str(root / "dir"): "is not a regular file",
        "s3://bucket/x.jsonl": "scheme 's3'",
        "relative.txt": "must be absolute",
        "": "empty",
    }
    for uri, message in cases.items():
        with pytest.raises(DatasetInputError, match=message.replace("(", r"\(")):
            resolve_dataset_path(uri, roots)


def test_jsonl_bad_records_are_skipped_and_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    big = b'{"text": "' + b"x" * 3000 + b'"}\n'
    path.write_bytes(b'{"text": "good one"}\n' + b'{"text": "bad \xff utf8"}\n'
                     + b"not json\n" + b'{"other": 1}\n' + b"[1, 2]\n" + big
                     + b'{"text": "good two"}\n')
    stats = ReadStats()
    docs = list(read_documents(path, "jsonl", "text", 2048, stats))
    assert docs == ["good one", "good two"]
    assert (stats.records_read, stats.invalid_utf8_skipped, stats.malformed_skipped,
            stats.oversized_skipped) == (7, 1, 3, 1)


def test_fifty_megabyte_line_is_skipped_without_holding_it(tmp_path):
    path = tmp_path / "huge.txt"
    with path.open("wb") as f:
        f.write(b"before\n\n")
        f.write(b"y" * (50 << 20) + b"\n\n")
        f.write(b"after\n")
    stats = ReadStats()
    docs = list(read_documents(path, "text", "", 1_000_000, stats))
    assert docs == ["before\n", "after\n"]
    assert stats.oversized_skipped == 1 and stats.records_read == 3


def test_text_records_split_on_blank_lines_and_percent_lines(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("one\nstill one\n%\ntwo\n\n\nthree\n%\n")
    assert list(read_documents(path, "text", "", 10_000, ReadStats())) == [
        "one\nstill one\n", "two\n", "three\n"]
