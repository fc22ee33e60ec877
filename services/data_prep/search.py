"""`lmforge search MODEL "query"`: the training passages nearest a query.

Run as `python -m services.data_prep.search INDEX_DIR QUERY [-k 5] [--json]` by the
CLI, which finds the model's dataset (and so its index) from the run events.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from services.data_prep.semantic import search


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmforge search", description=__doc__.splitlines()[0])
    parser.add_argument("index_dir", type=Path)
    parser.add_argument("query")
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not (args.index_dir / "index.json").exists():
        print(f"lmforge search: no semantic index at {args.index_dir} (the dataset was "
              "prepared with LMFORGE_DATAPREP_SEMANTIC=0)", file=sys.stderr)
        return 1
    meta = json.loads((args.index_dir / "index.json").read_text())
    if not meta.get("chunks"):
        print(f"lmforge search: the semantic index at {args.index_dir} is empty (the "
              "training split had no text to chunk)", file=sys.stderr)
        return 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hits = search(args.index_dir, args.query, args.k)
    if args.json:
        print(json.dumps([{"doc_id": h.doc_id, "score": round(h.score, 4), "text": h.chunk_text}
                          for h in hits], ensure_ascii=False))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"nearest training passages to {args.query!r}")
    for column in ("score", "document", "passage"):
        table.add_column(column)
    for hit in hits:
        table.add_row(f"{hit.score:.3f}", hit.doc_id, hit.chunk_text[:200])
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
