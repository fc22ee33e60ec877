"""A publisher-side journal of stored events, for proving "nothing lost, nothing done twice".

The stream alone cannot prove that no event was lost: an event the server
acknowledged and then forgot (a kill -9 of the nats-server before its store
was written) is simply absent. So each process that publishes can append one
line per *acknowledged* publish call to a file of its own under
`LMFORGE_PUBLISH_JOURNAL` (a directory): the subject, the `Nats-Msg-Id`, the
run id, whether the server reported it a duplicate, and the pid. The chaos
suite (`benchmarks/chaos.py`) then checks every journalled id against the
stream and the dead letters (lost = journalled, absent from both), and counts
the publish calls per stage-output id (more than one call = the stage's work
was done and published twice; JetStream's dedup window hides that from the
stream, not from the journal).

Off unless the variable is set: one `os.write` of an O_APPEND descriptor per
publish, atomic for a line this short, so concurrent processes never
interleave.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

JOURNAL_ENV = "LMFORGE_PUBLISH_JOURNAL"
"""A directory; each publishing process appends to `<dir>/<pid>.jsonl` in it."""


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One acknowledged publish call."""

    subject: str
    msg_id: str
    run_id: str
    duplicate: bool
    pid: int


class PublishJournal:
    """Appends one JSON line per acknowledged publish to `<directory>/<pid>.jsonl`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None
        self._pid = 0

    def record(self, *, subject: str, msg_id: str, run_id: str, duplicate: bool) -> None:
        pid = os.getpid()
        if self._fd is None or pid != self._pid:  # a forked child writes its own file
            self.directory.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.directory / f"{pid}.jsonl",
                               os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._pid = pid
        line = json.dumps({"subject": subject, "msg_id": msg_id, "run_id": run_id,
                           "duplicate": duplicate, "pid": pid}, separators=(",", ":"))
        os.write(self._fd, (line + "\n").encode())


def journal_from_env() -> PublishJournal | None:
    """The journal `LMFORGE_PUBLISH_JOURNAL` names, or None when it is unset."""
    directory = os.environ.get(JOURNAL_ENV, "")
    return PublishJournal(Path(directory)) if directory else None


def read_journal(directory: Path) -> Iterator[JournalEntry]:
    """Every entry of every process's file (a torn last line of a killed process is
    skipped: its publish call had not returned)."""
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                raw = json.loads(line)
            except json.JSONDecodeError:
                continue
            yield JournalEntry(subject=str(raw["subject"]), msg_id=str(raw["msg_id"]),
                               run_id=str(raw["run_id"]), duplicate=bool(raw["duplicate"]),
                               pid=int(raw["pid"]))
