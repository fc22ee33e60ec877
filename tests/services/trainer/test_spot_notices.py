"""Reading each cloud's spot notice, and an endpoint that does not answer."""

from __future__ import annotations

import logging
import socket

import pytest

from services.trainer.settings import TrainerSettings
from services.trainer.spot_notices import NoticeSource, NoticeWatcher, read_notice

AWS = NoticeSource.parse("aws")
GCP = NoticeSource.parse("gcp")
AZURE = NoticeSource.parse("azure")


def test_each_provider_answer_is_read_as_notice_or_none():
    assert read_notice(AWS, 404, b"Not Found") is None
    assert read_notice(AWS, 200, b'{"action": "stop", "time": "T"}').detail == "stop at T"
    assert read_notice(GCP, 200, b"FALSE") is None
    assert read_notice(GCP, 200, b"TRUE\n").reason() == "spot notice from gcp: preempted=TRUE"
    assert read_notice(AZURE, 200, b'{"DocumentIncarnation": 1, "Events": []}') is None
    reboot = b'{"Events": [{"EventId": "a", "EventType": "Reboot"}]}'
    assert read_notice(AZURE, 200, reboot) is None
    evicted = (b'{"Events": [{"EventId": "e1", "EventType": "Preempt", '
               b'"NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT"}]}')
    notice = read_notice(AZURE, 200, evicted)
    assert notice is not None and "Preempt e1" in notice.detail


def test_sources_default_to_the_metadata_endpoints_and_bad_ones_are_refused():
    assert AWS.url.endswith("/latest/meta-data/spot/instance-action")
    assert GCP.url.startswith("http://metadata.google.internal/")
    assert NoticeSource.parse("aws=http://127.0.0.1:9/x").url == "http://127.0.0.1:9/x"
    settings = TrainerSettings(trainer_spot_notices="aws, gcp=http://h/p")
    assert [s.provider for s in settings.notice_sources()] == ["aws", "gcp"]
    with pytest.raises(ValueError, match="must be one of aws, gcp, azure"):
        TrainerSettings(trainer_spot_notices="oracle")


def test_an_unreachable_endpoint_is_said_once_and_is_no_notice(caplog):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    watcher = NoticeWatcher([NoticeSource.parse(f"aws=http://127.0.0.1:{port}/x")], 0.1,
                            lambda n: None, timeout_s=0.5)
    with caplog.at_level(logging.WARNING, logger="lmforge.trainer.spot"):
        assert watcher.poll(watcher.sources[0]) is None
        assert watcher.poll(watcher.sources[0]) is None
    assert [r.message for r in caplog.records].count(
        next(r.message for r in caplog.records if "unreachable" in r.message)) == 1
