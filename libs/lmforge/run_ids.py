"""What a run id may be: it names files and object-store keys.

The trainer keeps `<home>/checkpoints/<run_id>.json` and `runs/<run_id>/...` in the
object store, so a run id is a path component: one with a separator, `..`, a NUL
or another control character would write outside those directories. The bus
refuses such an event before any handler sees it (dead-lettered, and a
`stage.failed` saying why), and `lmforge run --run-id` refuses it up front.
"""

from __future__ import annotations

MAX_RUN_ID_CHARS = 200


def run_id_problem(run_id: str) -> str | None:
    """Why `run_id` cannot name a run, or None when it can."""
    shown = repr(run_id[:60]) + ("..." if len(run_id) > 60 else "")
    if len(run_id) > MAX_RUN_ID_CHARS:
        return (f"run id {shown} has {len(run_id)} characters; the limit is "
                f"{MAX_RUN_ID_CHARS}")
    if run_id in (".", ".."):
        return f"run id {shown} is a relative directory name"
    bad = sorted({c for c in run_id if c in "/\\" or ord(c) < 32 or ord(c) == 127})
    if bad:
        return (f"run id {shown} contains {', '.join(repr(c) for c in bad)}: a run id "
                f"names files, so path separators and control characters are refused")
    return None
