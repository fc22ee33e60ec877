"""Reading datasets from local files: every format, directories, globs, the roots, bad input.

The files are tests/data/ingest/ (see make_ingest_data.py there); large or odd
inputs are written into tmp_path by the test that needs them.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.data_prep.documents import DecisionLog, Document
from services.data_prep.sources import (
    DataRoots,
    DatasetInputError,
    ReadConfig,
    ReadReason,
    dataset_digest,
    iter_documents,
    list_dataset_files,
    resolve_dataset_path,
    split_data_roots,
)
from tests.conftest import TEST_DATA

INGEST = TEST_DATA / "ingest"
CORPUS = INGEST / "corpus"


def read(spec: str | list[str], roots: list[Path] | None = None, *, spool: Path | None = None,
         **config: Any) -> tuple[list[Document], DecisionLog]:
    log = DecisionLog()
    docs = list(iter_documents(spec, roots=roots or [INGEST], log=log,
                               config=ReadConfig(**config), spool_dir=spool))
    return docs, log


def drops(log: DecisionLog) -> dict[str, int]:
    return {reason: n for (stage, reason), n in log.counts.items() if stage == "read"}


def test_a_directory_is_one_dataset_in_every_format_in_key_order(tmp_path):
    docs, log = read(str(CORPUS), spool=tmp_path)
    assert drops(log) == {}
    by_file: dict[str, int] = {}
    for doc in docs:
        name = Path(doc.source).relative_to(CORPUS).as_posix()
        by_file[name] = by_file.get(name, 0) + 1
    # Sorted by relative path as S3 lists keys; _SUCCESS is skipped; one fortune of the 12
    # holds a blank line, which separates documents in plain text.
    assert list(by_file.items()) == [
        ("2024/part-0000.jsonl.gz", 10), ("2024/part-0001.jsonl.zst", 10),
        ("archive/wiki-old.parquet.gz", 6), ("fortunes.txt", 13), ("notes.txt.zst", 5),
        ("tickets.csv", 5), ("tickets.tsv", 4), ("wiki.parquet", 30)]
    assert log.tallies[("read", "files")] == 8 and log.tallies[("read", "records")] == 83
    ids = {doc.id: doc for doc in docs}
    assert ids["ticket-3"].meta == {"team": "support", "priority": "0",
                                    "tags": '["export", "2024"]'}
    assert ids["T-2"].text == "The export has two lines:\nline one, then\nline two."
    assert ids["T-2"].meta == {"title": "Export", "priority": "low"}
    assert ids["W-1"].meta == {"team": "wiki"}
    assert ids["page-015"].text.startswith("机器学习") and ids["page-015"].meta == {
        "lang": "zh", "views": "1015"}
    # Records without an id of their own are numbered within their file.
    zst = str(CORPUS / "2024" / "part-0001.jsonl.zst")
    assert ids[f"{zst}#3"].text.startswith("用户的工单") and ids[f"{zst}#3"].meta == {"lang": "zh"}
    assert ids[f"{CORPUS / 'fortunes.txt'}#0"].text == "A day for firm decisions!!!!!  Or is it?\n"
    again, _ = read(str(CORPUS), spool=tmp_path)
    assert [d.id for d in again] == [d.id for d in docs]


def test_a_glob_and_several_specs_make_one_dataset(tmp_path):
    docs, _ = read(str(CORPUS / "**" / "*.jsonl.*"))
    assert len(docs) == 20 and docs[0].id == "ticket-0"
    csv_file = str(CORPUS / "tickets.csv")
    both, _ = read([csv_file, str(CORPUS / "*.tsv"), csv_file])
    assert [d.id for d in both] == ["T-1", "T-2", "T-3", "T-4", "T-5", "W-0", "W-1", "W-2", "W-3"]
    with pytest.raises(DatasetInputError, match=r"dataset glob '.*\*\.xml' matched no files"):
        read(str(CORPUS / "*.xml"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(DatasetInputError, match="holds no files"):
        read(str(tmp_path / "empty"), roots=[tmp_path])


def test_the_format_is_given_or_inferred_from_the_name(tmp_path):
    (tmp_path / "export.data").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "notes").write_text("first\n%\nsecond\n")
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.4 not text")
    docs, _ = read(str(tmp_path / "export.data"), [tmp_path], format="jsonl")
    assert [d.text for d in docs] == ["one", "two"]
    with pytest.raises(DatasetInputError, match=r"its name tells no format; give the format"):
        read(str(tmp_path / "export.data"), [tmp_path])
    docs, log = read(str(tmp_path), [tmp_path])
    assert [d.text for d in docs] == ["first\n", "second\n"]  # no extension reads as text
    assert drops(log) == {"read.unknown_format": 2}


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
    listing = {
        "/etc/pass*": "dataset path '/etc/pass\\*' is outside the allowed roots",
        str(root / "escape.txt"): "outside the allowed roots",
        str(root / "*.txt"): "outside the allowed roots",  # a match escapes through a link
        str(root / "missing"): "does not exist",
        "gs://bucket/x": "scheme 'gs'",
    }
    for spec, message in listing.items():
        with pytest.raises(DatasetInputError, match=message):
            list_dataset_files(spec, roots)
    (root / "escape.txt").unlink()
    (root / "sub").mkdir()
    (root / "sub" / "leak").symlink_to("/etc/hostname")
    with pytest.raises(DatasetInputError, match="leak' is outside the allowed roots"):
        list_dataset_files(str(root), roots)


def test_data_roots_hold_directories_and_bucket_prefixes():
    assert split_data_roots("/data:s3://corp-bucket/exports/,/srv/more") == [
        "/data", "s3://corp-bucket/exports/", "/srv/more"]
    roots = DataRoots.parse(["/data", "s3://corp-bucket/exports/", "s3://whole-bucket"])
    assert roots.describe() == os.pathsep.join(
        ["/data", "s3://corp-bucket/exports/", "s3://whole-bucket/"])
    assert roots.allows_object("corp-bucket", "exports/2026/a.jsonl")
    assert roots.allows_object("corp-bucket", "exports")
    assert not roots.allows_object("corp-bucket", "exports-private/a.jsonl")
    assert not roots.allows_object("other-bucket", "exports/a.jsonl")
    assert roots.allows_object("whole-bucket", "any/key")
    with pytest.raises(ValueError, match="scheme 'gs' is not supported"):
        DataRoots.parse(["gs://bucket/"])


def test_read_config_refuses_bad_values():
    with pytest.raises(ValueError, match="format 'xml' is not one of auto, jsonl"):
        ReadConfig(format="xml")
    with pytest.raises(ValueError, match="max_record_bytes 0 must be positive"):
        ReadConfig(max_record_bytes=0)


def test_gb18030_and_utf16_are_decoded_and_an_ambiguous_code_page_refused():
    docs, log = read(str(INGEST / "encodings"))
    by_file: dict[str, list[str]] = {}
    for doc in docs:
        by_file.setdefault(Path(doc.source).name, []).append(doc.text.strip())
    chinese = by_file["zh-gb18030.txt"]
    assert chinese[0] == "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。"
    assert by_file["zh-utf16-bom.txt"] == chinese and len(chinese) == 5
    assert by_file["en-utf16le.jsonl"][0] == "A day for firm decisions!!!!!  Or is it?"
    assert len(by_file["en-utf16le.jsonl"]) == 8
    assert "latin1.txt" not in by_file  # cp1252, cp1257, ... read it equally well
    assert drops(log) == {"read.unknown_encoding": 1}


def test_utf8_with_a_bom_and_crlf_reads_clean(tmp_path):
    (tmp_path / "t.csv").write_bytes(b"\xef\xbb\xbfid,text\r\n1,hello\r\n2,world\r\n")
    docs, _ = read(str(tmp_path / "t.csv"), [tmp_path])
    assert [(d.id, d.text) for d in docs] == [("1", "hello"), ("2", "world")]


def test_binary_files_and_nul_bytes_are_counted_not_read(tmp_path):
    docs, log = read(str(INGEST / "bad" / "blob.txt"))
    assert docs == [] and drops(log) == {"read.binary": 1}
    docs, log = read(str(INGEST / "bad" / "nul-records.jsonl"))
    assert [d.text for d in docs] == ["clean one", "clean two"]
    assert drops(log) == {"read.nul_bytes": 2}
    (tmp_path / "zeros.txt").write_bytes(bytes(100_000))
    docs, log = read(str(tmp_path / "zeros.txt"), [tmp_path])
    assert docs == [] and drops(log) == {"read.binary": 1}


def test_jsonl_bad_records_are_skipped_and_counted():
    docs, log = read(str(INGEST / "bad" / "mixed-bad.jsonl"), max_record_bytes=2048)
    assert [(d.id, d.text) for d in docs] == [
        ("7", "good one"), (f"{INGEST / 'bad' / 'mixed-bad.jsonl'}#6", "good two")]
    assert drops(log) == {"read.invalid_utf8": 1, "read.malformed_json": 1,
                          "read.missing_text": 1, "read.not_an_object": 1, "read.oversized": 1}
    assert log.tallies[("read", "records")] == 7


def test_fifty_megabyte_line_is_skipped_without_holding_it(tmp_path):
    path = tmp_path / "huge.txt"
    with path.open("wb") as f:
        f.write(b"before\n\n")
        f.write(b"y" * (50 << 20) + b"\n\n")
        f.write(b"after\n")
    docs, log = read(str(path), [tmp_path])
    assert [d.text for d in docs] == ["before\n", "after\n"]
    assert drops(log) == {"read.oversized": 1} and log.tallies[("read", "records")] == 3


def test_text_records_split_on_blank_lines_and_percent_lines(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("one\nstill one\n%\ntwo\n\n\nthree\n%\n")
    docs, _ = read(str(path), [tmp_path])
    assert [d.text for d in docs] == ["one\nstill one\n", "two\n", "three\n"]


@pytest.mark.parametrize("name", ["bomb.jsonl.gz", "bomb.jsonl.zst"])
def test_a_compressed_file_expanding_past_the_cap_is_refused(name):
    spec = str(INGEST / "bad" / name)  # 8 MiB of one repeated line
    docs, log = read(spec, max_expanded_bytes=1 << 20)
    assert drops(log) == {"read.expansion_cap": 1} and 0 < len(docs) < 8000
    docs, log = read(spec, max_expansion_ratio=50, expansion_ratio_after_bytes=1 << 20)
    assert drops(log) == {"read.expansion_cap": 1} and len(docs) < 8000
    docs, log = read(spec)
    with gzip.open(INGEST / "bad" / "bomb.jsonl.gz") as f:
        assert drops(log) == {} and len(docs) == sum(1 for _ in f)


@pytest.mark.parametrize("name", ["truncated.jsonl.gz", "truncated.jsonl.zst"])
def test_a_truncated_stream_is_a_corrupt_file(name, tmp_path):
    docs, log = read(str(INGEST / "bad" / name))
    assert drops(log) == {"read.corrupt_file": 1}
    (tmp_path / "fake.jsonl.gz").write_bytes(b"not gzip at all\n")
    docs, log = read(str(tmp_path / "fake.jsonl.gz"), [tmp_path])
    assert docs == [] and drops(log) == {"read.corrupt_file": 1}


def test_concatenated_zstd_frames_read_as_one_stream_and_garbage_is_corrupt(tmp_path):
    import zstandard

    frame = zstandard.ZstdCompressor()
    (tmp_path / "two.jsonl.zst").write_bytes(frame.compress(b'{"text": "frame one"}\n')
                                             + frame.compress(b'{"text": "frame two"}\n'))
    docs, log = read(str(tmp_path / "two.jsonl.zst"), [tmp_path])
    assert [d.text for d in docs] == ["frame one", "frame two"] and drops(log) == {}
    (tmp_path / "fake.jsonl.zst").write_bytes(b"not zstd at all, just text\n")
    docs, log = read(str(tmp_path / "fake.jsonl.zst"), [tmp_path])
    assert docs == [] and drops(log) == {"read.corrupt_file": 1}


def test_a_detected_encoding_that_breaks_later_refuses_the_rest_of_the_file(tmp_path):
    records = [f"第{i}条：数据准备需要处理各种编码。" for i in range(3000)]
    head = "\n%\n".join(records).encode("gb18030")  # past the 64 KiB the detector sees
    assert len(head) > 64 << 10
    (tmp_path / "broken.txt").write_bytes(head + b"\n%\n\xff\xff\xff\n%\nafter\n")
    docs, log = read(str(tmp_path / "broken.txt"), [tmp_path])
    assert [d.text.strip() for d in docs] == records  # every record before the bad bytes
    assert drops(log) == {"read.decode_error": 1}


def test_compression_is_recognised_by_its_magic_bytes(tmp_path):
    (tmp_path / "export.jsonl").write_bytes(gzip.compress(b'{"text": "inside gzip"}\n'))
    docs, _ = read(str(tmp_path / "export.jsonl"), [tmp_path])
    assert [d.text for d in docs] == ["inside gzip"]


def test_csv_without_the_text_column_fails_the_dataset():
    spec = str(INGEST / "bad" / "no-text-column.csv")
    with pytest.raises(DatasetInputError, match=r"no-text-column.csv' has no column 'text' "
                                                r"\(columns: id, body\)"):
        read(spec)
    docs, _ = read(spec, text_field="body")
    assert [(d.id, d.text) for d in docs] == [("1", "hello")]


def test_csv_bad_rows_are_counted(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(b"text,id\n"
                     b"fine,1\n"
                     b'"' + b"z" * 5000 + b'",2\n'
                     b"bad \xff bytes,3\n"
                     b"\n"
                     + b"w" * 6000 + b"\n"
                     b'"multi\nline",4\n')
    docs, log = read(str(path), [tmp_path], max_record_bytes=2048)
    assert [(d.id, d.text) for d in docs] == [("1", "fine"), ("4", "multi\nline")]
    assert drops(log) == {"read.oversized": 2, "read.invalid_utf8": 1}


def test_parquet_text_column_must_be_strings(tmp_path):
    with pytest.raises(DatasetInputError,
                       match=r"column 'text' of '.*int-text.parquet' is int64, not a string"):
        read(str(INGEST / "bad" / "int-text.parquet"))
    with pytest.raises(DatasetInputError, match=r"has no column 'body' \(columns: id, text"):
        read(str(CORPUS / "wiki.parquet"), text_field="body")
    table = pa.table({"text": pa.array(["ok", None, "q" * 5000], pa.large_string()),
                      "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "nulls.parquet")
    docs, log = read(str(tmp_path / "nulls.parquet"), [tmp_path], max_record_bytes=2048)
    assert [(d.text, d.meta) for d in docs] == [("ok", {"n": "1"})]
    assert drops(log) == {"read.missing_text": 1, "read.oversized": 1}
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 but not really")
    docs, log = read(str(tmp_path / "fake.parquet"), [tmp_path])
    assert drops(log) == {"read.corrupt_file": 1}


def test_compressed_parquet_needs_the_work_dir_and_leaves_nothing_there(tmp_path):
    spec = str(CORPUS / "archive" / "wiki-old.parquet.gz")
    with pytest.raises(DatasetInputError, match=r"compressed Parquet.*no work directory"):
        read(spec)
    docs, _ = read(spec, spool=tmp_path)
    assert [d.id for d in docs] == [f"page-{i:03d}" for i in range(6)]
    assert list(tmp_path.iterdir()) == []


def test_nothing_of_the_data_is_written_outside_the_work_dir(tmp_path, monkeypatch):
    watched, work = tmp_path / "tmp", tmp_path / "work"
    watched.mkdir()
    work.mkdir()
    monkeypatch.setenv("TMPDIR", str(watched))
    monkeypatch.setattr(tempfile, "tempdir", str(watched))
    spooled = set()
    for doc in iter_documents(str(CORPUS), roots=[INGEST], log=DecisionLog(), spool_dir=work):
        spooled.update(p.name for p in work.iterdir())
        assert doc.text
    assert len(spooled) == 1 and next(iter(spooled)).startswith(".read-")
    log = DecisionLog()
    specs = [str(INGEST / "encodings"), str(INGEST / "bad" / "*.t*"),
             str(INGEST / "bad" / "*.jsonl")]
    assert len(list(iter_documents(specs, roots=[INGEST], log=log, spool_dir=work))) == 23
    assert log.dropped() == 8
    assert list(watched.iterdir()) == [] and list(work.iterdir()) == []


def test_same_bytes_under_other_names_have_the_same_digest(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for n in range(3):
        (a / f"{n}.jsonl").write_text(json.dumps({"text": f"doc {n}"}) + "\n")
        (b / f"part-{n}.jsonl").write_text(json.dumps({"text": f"doc {n}"}) + "\n")
    first = dataset_digest(list_dataset_files(str(a), [tmp_path]))
    assert first == dataset_digest(list_dataset_files(str(b), [tmp_path]))
    (b / "part-2.jsonl").write_text(json.dumps({"text": "changed"}) + "\n")
    assert first != dataset_digest(list_dataset_files(str(b), [tmp_path]))


def test_reason_codes_name_the_read_stage():
    assert all(reason.value.startswith("read.") for reason in ReadReason)
