"""`lmforge prep DATA... --out DIR`: the data-prep pipeline without the bus, to inspect.

The same stages, settings (`LMFORGE_DATAPREP_*`, `LMFORGE_DATA_ROOTS`) and code
as the service, before any GPU hour is spent. It writes:

- `DIR/kept.jsonl`: one line per kept document: id, text (as it will be
  trained on: normalised, PII replaced), split (train or heldout), weight;
- `DIR/report.json`: the counts per stage and reason, and per document its id,
  whether it was kept, the stage and reason that dropped it, and its
  near-duplicate cluster;
- `DIR/dataset/`: the tokenized dataset the trainer would read;

and prints a summary table (or, with --json, the counts as JSON). Run as
`python -m services.data_prep.dry_run` (the CLI does).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.failures import BadInput
from lmforge.settings import load_settings
from services.data_prep.documents import DecisionLog
from services.data_prep.prepare import PrepStats, prepare_dataset
from services.data_prep.settings import DataPrepSettings


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    if path.exists():
        with path.open(encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def write_report(out: Path, stats: PrepStats, decisions: Path, kept: Path) -> Path:
    """report.json, streamed: the per-document list can be millions long."""
    clusters = {d["id"]: d["cluster"] for d in _lines(decisions) if d["kept"] and d["cluster"]}
    by_stage: dict[str, dict[str, int]] = {}
    for reason, n in stats.dropped.items():
        by_stage.setdefault(reason.split(".", 1)[0], {})[reason] = n
    report = out / "report.json"
    with report.open("w", encoding="utf-8") as f:
        head = {"stats": stats.as_flat_dict(), "dropped_by_stage": by_stage,
                "tallies": stats.tallies}
        f.write(json.dumps(head, ensure_ascii=False, indent=1)[:-2])
        f.write(',\n "documents": [\n')
        first = True
        for d in _lines(decisions):
            if d["kept"]:
                continue
            entry = {"id": d["id"], "kept": False, "stage": d["stage"], "reason": d["reason"],
                     "cluster": d["cluster"], "detail": d["detail"]}
            f.write(("" if first else ",\n") + "  " + json.dumps(entry, ensure_ascii=False))
            first = False
        for doc in _lines(kept):
            entry = {"id": doc["id"], "kept": True, "split": doc["split"],
                     "weight": doc["weight"], "cluster": clusters.get(doc["id"], "")}
            f.write(("" if first else ",\n") + "  " + json.dumps(entry, ensure_ascii=False))
            first = False
        f.write("\n ]\n}\n")
    return report


def run_dry(specs: list[str], out: Path, settings: DataPrepSettings) -> PrepStats:
    out.mkdir(parents=True, exist_ok=True)
    decisions = out / "decisions.jsonl"
    log = DecisionLog(decisions)
    try:
        stats = prepare_dataset(specs, "", "", out / "dataset", settings.prep_config(),
                                roots=settings.data_roots, log=log, kept_path=out / "kept.jsonl")
    finally:
        log.close()
    write_report(out, stats, decisions, out / "kept.jsonl")
    decisions.unlink()
    return stats


def _print_summary(stats: PrepStats, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lmforge prep: {stats.records_read} records read, "
                        f"{stats.records_kept} kept ({stats.train_documents} train, "
                        f"{stats.heldout_documents} held out), {stats.train_tokens} train tokens")
    for column in ("stage", "reason", "documents"):
        table.add_column(column)
    for reason, n in sorted(stats.dropped.items(), key=lambda item: (item[0].split(".")[0],
                                                                     -item[1])):
        table.add_row(reason.split(".", 1)[0], reason, str(n))
    for what, n in sorted(stats.tallies.items()):
        if what.startswith("pii.") and what != "pii.documents_scrubbed":
            table.add_row("pii", f"{what} replaced", str(n))
    console = Console(stderr=True)
    console.print(table)
    console.print(f"kept documents: {out / 'kept.jsonl'}; every decision: {out / 'report.json'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmforge prep", description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+", help="files, directories, globs or s3:// URLs")
    parser.add_argument("--out", type=Path, required=True, help="where the report goes")
    parser.add_argument("--json", action="store_true", help="the counts as JSON on stdout")
    args = parser.parse_args(argv)
    settings = load_settings(DataPrepSettings)
    try:
        stats = run_dry(args.data, args.out, settings)
    except BadInput as exc:
        print(f"lmforge prep: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"out": str(args.out), **stats.as_flat_dict()}))
    else:
        _print_summary(stats, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
