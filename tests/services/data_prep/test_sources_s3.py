"""Reading datasets from S3: a real S3-protocol server (moto) on 127.0.0.1, reached through
s3fs with the endpoint from AWS_ENDPOINT_URL or the config, as a user's MinIO would be."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from services.data_prep.documents import DecisionLog, Document
from services.data_prep.sources import (
    DatasetInputError,
    ReadConfig,
    dataset_digest,
    iter_documents,
    list_dataset_files,
)
from tests.conftest import TEST_DATA

pytestmark = pytest.mark.servers

INGEST = TEST_DATA / "ingest"
CORPUS = INGEST / "corpus"


def read(spec: str | list[str], roots: list[str], *, spool: Path | None = None,
         **config: Any) -> tuple[list[Document], DecisionLog]:
    log = DecisionLog()
    docs = list(iter_documents(spec, roots=roots, log=log, config=ReadConfig(**config),
                               spool_dir=spool))
    return docs, log


def upload(s3, local: Path, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            s3.put(prefix + path.relative_to(local).as_posix(), path.read_bytes())


def test_a_prefix_reads_like_the_same_directory_on_disk(s3, tmp_path):
    upload(s3, CORPUS, "exports/2026/")
    s3.put("secrets/passwords.jsonl", b'{"text": "hunter2"}\n')
    roots = [s3.url("exports/")]
    docs, log = read(s3.url("exports/2026/"), roots, spool=tmp_path)
    local, _ = read(str(CORPUS), [str(INGEST)], spool=tmp_path)
    assert log.counts == {} and log.tallies[("read", "files")] == 8
    assert [(d.text, d.meta) for d in docs] == [(d.text, d.meta) for d in local]
    assert docs[0].source == s3.url("exports/2026/2024/part-0000.jsonl.gz")
    assert f"{s3.url('exports/2026/fortunes.txt')}#0" in {d.id for d in docs}
    assert list(tmp_path.iterdir()) == []
    # The prefix without its slash, and the whole bucket as the root, read the same.
    again, _ = read(s3.url("exports/2026"), [s3.url()], spool=tmp_path)
    assert [d.id for d in again] == [d.id for d in docs]


def test_one_object_a_glob_and_each_format(s3, tmp_path):
    upload(s3, CORPUS, "exports/")
    roots = [s3.url("exports/")]
    docs, _ = read(s3.url("exports/tickets.csv"), roots)
    assert [d.id for d in docs] == ["T-1", "T-2", "T-3", "T-4", "T-5"]
    docs, _ = read(s3.url("exports/*/*.jsonl.*"), roots)
    assert len(docs) == 20 and docs[0].meta["team"] == "support"
    assert docs[10].text.startswith("机器学习")  # the .zst part
    docs, _ = read(s3.url("exports/wiki.parquet"), roots)
    assert len(docs) == 30 and docs[15].meta == {"lang": "zh", "views": "1015"}
    docs, _ = read(s3.url("exports/archive/wiki-old.parquet.gz"), roots, spool=tmp_path)
    assert [d.id for d in docs] == [f"page-{i:03d}" for i in range(6)]
    docs, _ = read([s3.url("exports/notes.txt.zst"), s3.url("exports/tickets.tsv")], roots)
    assert len(docs) == 9 and docs[-1].id == "W-3"
    with pytest.raises(DatasetInputError, match=r"dataset glob 's3://.*/exports/\*\.xml' "
                                                r"matched no files"):
        read(s3.url("exports/*.xml"), roots)


def test_bad_objects_are_counted_as_on_disk(s3):
    upload(s3, INGEST / "bad", "in/")
    roots = [s3.url("in/")]
    docs, log = read([s3.url("in/bomb.jsonl.zst"), s3.url("in/blob.txt"),
                      s3.url("in/truncated.jsonl.gz"), s3.url("in/mixed-bad.jsonl")],
                     roots, max_expanded_bytes=1 << 20)
    assert [d.text for d in docs if d.source.endswith("mixed-bad.jsonl")][::2] == [
        "good one", "good two"]  # and the 3000-byte record between them
    assert {r: n for (_, r), n in log.counts.items()} == {
        "read.expansion_cap": 1, "read.binary": 1, "read.corrupt_file": 1,
        "read.invalid_utf8": 1, "read.malformed_json": 1, "read.missing_text": 1,
        "read.not_an_object": 1}
    with pytest.raises(DatasetInputError, match=r"column 'text' of 's3://.*/in/int-text.parquet'"
                                                r" is int64, not a string"):
        read(s3.url("in/int-text.parquet"), roots)
    with pytest.raises(DatasetInputError, match=r"'s3://.*/in/no-text-column.csv' has no "
                                                r"column 'text'"):
        read(s3.url("in/no-text-column.csv"), roots)


def test_urls_outside_the_bucket_roots_are_refused(s3):
    s3.put("exports/a.jsonl", b'{"text": "a"}\n')
    s3.put("exports-private/b.jsonl", b'{"text": "b"}\n')
    roots = ["/data", s3.url("exports/")]
    for url in (s3.url("exports-private/b.jsonl"), s3.url("exp*/a.jsonl"),
                "s3://another-bucket/exports/a.jsonl"):
        with pytest.raises(DatasetInputError, match=r"is outside the allowed roots "
                                                    r"\(LMFORGE_DATA_ROOTS=/data:s3://corp-"):
            list_dataset_files(url, roots)
    with pytest.raises(DatasetInputError, match=r"has '\.' or '\.\.' segments; give the key"):
        list_dataset_files(s3.url("exports/../exports-private/b.jsonl"), roots)
    with pytest.raises(DatasetInputError, match="outside the allowed roots"):
        list_dataset_files(s3.url("exports/a.jsonl"), ["/data"])


def test_a_missing_key_or_prefix_fails_the_dataset_naming_the_url(s3):
    s3.put("exports/a.jsonl", b'{"text": "a"}\n')
    roots = [s3.url()]
    for url in (s3.url("exports/missing.jsonl"), s3.url("nothing-here/"),
                "s3://no-such-bucket-4f1c/x.jsonl"):
        with pytest.raises(DatasetInputError, match=rf"dataset URL '{url}' does not exist "
                                                    r"\(.*\); check the bucket"):
            list_dataset_files(url, [*roots, "s3://no-such-bucket-4f1c/"])


def test_the_endpoint_can_be_set_in_the_config(s3, monkeypatch):
    s3.put("a.jsonl", b'{"text": "from the configured endpoint"}\n')
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    docs, _ = read(s3.url("a.jsonl"), [s3.url()], s3_endpoint_url=s3.endpoint)
    assert [d.text for d in docs] == ["from the configured endpoint"]
    digest = dataset_digest(list_dataset_files(s3.url("a.jsonl"), [s3.url()],
                                               config=ReadConfig(s3_endpoint_url=s3.endpoint)),
                            config=ReadConfig(s3_endpoint_url=s3.endpoint))
    assert len(digest) == 64


@pytest.fixture
def enforced_iam(s3) -> Iterator[Any]:
    """moto checks IAM only when told to (process-wide): on for this test, then off."""
    iam = boto3.client("iam", endpoint_url=s3.endpoint, region_name="us-east-1")

    def set_auth(count: str) -> None:
        request = urllib.request.Request(f"{s3.endpoint}/moto-api/reset-auth",
                                         data=count.encode(), method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

    yield iam, set_auth
    set_auth("inf")


def user_keys(iam: Any, name: str, policy: dict[str, Any] | None = None) -> dict[str, str]:
    iam.create_user(UserName=name)
    if policy is not None:
        iam.put_user_policy(UserName=name, PolicyName="read", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


def test_access_denied_fails_the_dataset_naming_the_url_and_the_cause(s3, enforced_iam,
                                                                      monkeypatch):
    iam, set_auth = enforced_iam
    s3.put("exports/a.jsonl", b'{"text": "a"}\n')
    nobody = user_keys(iam, f"nobody-{s3.name}")
    lister = user_keys(iam, f"lister-{s3.name}", {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{s3.name}"}]})
    set_auth("0")
    roots = [s3.url("exports/")]
    for name, value in nobody.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DatasetInputError, match=rf"access to dataset URL '{s3.url('exports/')}' "
                                                r"was denied \(PermissionError: .*\); check the "
                                                r"AWS credentials"):
        read(s3.url("exports/"), roots)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEY00000000")
    with pytest.raises(DatasetInputError, match=r"was denied \(PermissionError: "):
        read(s3.url("exports/a.jsonl"), roots)
    # Listing allowed, reading not: the refusal comes while opening the object.
    for name, value in lister.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DatasetInputError, match=rf"access to dataset URL "
                                                rf"'{s3.url('exports/a.jsonl')}' was denied"):
        read(s3.url("exports/"), roots)
