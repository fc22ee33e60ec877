"""What flows through data-prep: documents, the stages they pass, and every decision.

A `Document` is one record of the user's data with a stable id (the record's own
`id` field, else its source and position) and the metadata fields kept through
the pipeline. A stage is anything with `run(docs, log) -> docs`: it yields the
documents it keeps (maybe rewritten, as the PII scrub does) and tells the
`DecisionLog` why it dropped each other one. The log counts every (stage,
reason) pair in memory and streams the per-document decisions to a JSONL file,
so a corpus of millions of documents does not hold its report in memory.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol


@dataclass(slots=True)
class Document:
    id: str
    """Stable across runs: the record's `id` field, else `<source>#<ordinal>`."""
    text: str
    meta: dict[str, str] = field(default_factory=dict)
    """Other fields of the record, kept through the pipeline (JSONL/CSV/Parquet columns)."""
    source: str = ""
    """The file or URL the record came from."""
    messages: list[dict[str, str]] | None = None
    """A chat record's turns ({"role", "content"}), in order; None for plain text. `text`
    is then the contents joined by blank lines, which is what the filters, the dedup and
    the language check judge; the PII scrub rewrites each content and `text` with it."""

    def with_messages(self, messages: list[dict[str, str]]) -> Document:
        """This chat document with new turns, and `text` made from them."""
        return dataclasses.replace(self, messages=messages,
                                   text=chat_text(messages))


def chat_text(messages: list[dict[str, str]]) -> str:
    """What the text stages see of a conversation: its contents, without roles or
    template markup, so a filter judges what the users wrote."""
    return "\n\n".join(m["content"] for m in messages)


@dataclass(frozen=True, slots=True)
class Decision:
    doc_id: str
    stage: str
    """The stage that decided: "read", "clean", "quality", "pii", "near_dup", "semantic", ..."""
    kept: bool
    reason: str = ""
    """A reason code, `<stage>.<code>` (e.g. "quality.too_short"), for drops."""
    cluster: str = ""
    """The near-duplicate cluster the document belongs to, where a dedup stage found one."""
    detail: str = ""


class DecisionLog:
    """Counts per stage and reason; the per-document decisions go to `path` as JSONL."""

    def __init__(self, path: Path | None = None) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        """Dropped documents per (stage, reason)."""
        self.tallies: Counter[tuple[str, str]] = Counter()
        """Other counts per (stage, what): PII replacements per type, clusters found..."""
        self.path = path
        self._file: IO[str] | None = path.open("w", encoding="utf-8") if path else None

    def drop(self, doc: Document | str, stage: str, reason: str, *, cluster: str = "",
             detail: str = "") -> None:
        """Record that `stage` dropped `doc` for `reason` (a `<stage>.<code>` string)."""
        self.record(Decision(doc.id if isinstance(doc, Document) else doc, stage, False,
                             reason, cluster, detail))

    def keep(self, doc: Document | str, stage: str, *, cluster: str = "",
             detail: str = "") -> None:
        """Record a kept document where the keeping itself is news (a cluster's keeper)."""
        self.record(Decision(doc.id if isinstance(doc, Document) else doc, stage, True,
                             "", cluster, detail))

    def count(self, stage: str, reason: str, n: int = 1) -> None:
        """Count without a per-document line (e.g. PII replacements per type)."""
        self.tallies[(stage, reason)] += n

    def record(self, decision: Decision) -> None:
        if not decision.kept:
            self.counts[(decision.stage, decision.reason)] += 1
        if self._file is not None:
            self._file.write(json.dumps({
                "id": decision.doc_id, "stage": decision.stage, "kept": decision.kept,
                "reason": decision.reason, "cluster": decision.cluster,
                "detail": decision.detail}, ensure_ascii=False) + "\n")

    def dropped(self, stage: str | None = None) -> int:
        return sum(n for (s, _), n in self.counts.items() if stage is None or s == stage)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Stage(Protocol):
    """One step of the pipeline."""

    name: str

    def run(self, docs: Iterable[Document], log: DecisionLog) -> Iterator[Document]: ...
