"""The publish journal the chaos suite counts with: one line per acknowledged publish call,
the server's duplicate verdict kept, nothing written when it is off."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lmforge.bus import EventBus
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.runtime.publish_journal import JOURNAL_ENV, PublishJournal, read_journal


def test_entries_round_trip_and_a_torn_line_is_skipped(tmp_path: Path) -> None:
    journal = PublishJournal(tmp_path)
    journal.record(subject="lmforge.model.trained", msg_id="r:model.trained:1", run_id="r",
                   duplicate=False)
    with next(tmp_path.glob("*.jsonl")).open("a") as f:
        f.write('{"subject": "lmforge.model.tr')  # a process killed mid-write
    (entry,) = list(read_journal(tmp_path))
    assert (entry.subject, entry.msg_id, entry.run_id, entry.duplicate) == (
        "lmforge.model.trained", "r:model.trained:1", "r", False)


@pytest.mark.connected
def test_a_second_publish_call_of_one_id_is_journalled_as_a_duplicate(
        nats_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(JOURNAL_ENV, str(tmp_path / "journal"))

    async def twice() -> None:
        for _ in range(2):  # e.g. a stage redone after a kill: the stream dedups it
            bus = EventBus("trainer")
            await bus.connect(nats_server.url)
            await bus.publish(ev.ModelTrained(run_id="r1"), msg_id="r1:model.trained:x")
            await bus.close()

    asyncio.run(twice())
    entries = list(read_journal(tmp_path / "journal"))
    assert [(e.msg_id, e.duplicate) for e in entries] == [
        ("r1:model.trained:x", False), ("r1:model.trained:x", True)]


@pytest.mark.connected
def test_nothing_is_journalled_when_it_is_off(nats_server, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(JOURNAL_ENV, raising=False)

    async def once() -> EventBus:
        bus = EventBus("trainer")
        await bus.connect(nats_server.url)
        await bus.publish(ev.ModelTrained(run_id="r1"), msg_id="r1:model.trained:y")
        await bus.close()
        return bus

    assert asyncio.run(once()).journal is None
