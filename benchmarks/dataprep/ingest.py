"""Ingest throughput and memory: more than 1 GB of input read through `sources.iter_documents`.

    python -m benchmarks.dataprep.ingest [--scale 1.0] [--dir DIR] [--keep] [--out FILE]

Input, generated under a temporary directory (or --dir) from
tests/data/fortunes-sample.txt, each document two fortunes joined with a few
words swapped and a serial number, so no two are the same: plain JSONL,
JSONL.gz (gzip -1, several shards), text.zst (documents between `%` lines),
CSV (text plus three meta columns) and Parquet (64k-row groups, snappy).
At --scale 1 that is about 1.0 GB as stored and 1.4 GB expanded.

Reading: a child process (OMP passive) reads each
format's files through `iter_documents` as one dataset, counting documents
and text bytes, and reports per-format and total docs/s and MB/s (expanded
bytes, i.e. what the parsers see — for Parquet the text column's bytes — and
bytes as stored). Peak RSS is the
reading child's `ru_maxrss` (from wait4; the input is generated in another
child so the parent stays small); the child also reports its RSS after its
imports (python, pyarrow, s3fs, zstandard), so the reading's own share is the
difference. Prints JSON.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FORTUNES = ROOT / "tests" / "data" / "fortunes-sample.txt"

# Expanded bytes per format at --scale 1, and the files each is split into.
PLAN = {"jsonl": (500 << 20, 2), "csv": (200 << 20, 1), "parquet": (200 << 20, 2),
        "jsonl.gz": (300 << 20, 4), "txt.zst": (250 << 20, 2)}
GLOBS = {"jsonl": "*.jsonl", "csv": "*.csv", "parquet": "*.parquet",
         "jsonl.gz": "*.jsonl.gz", "txt.zst": "*.txt.zst"}
SWAPS = [("you", "thou"), ("the", "a"), ("will", "shall"), ("is", "was"), ("and", "&"),
         ("time", "hour"), ("man", "person"), ("love", "care"), ("day", "night")]


def documents(seed: int) -> Any:
    """Endless distinct documents: two fortunes, a few words swapped, a serial number."""
    fortunes = [f.strip() for f in FORTUNES.read_text().split("\n%\n") if f.strip()]
    # One record per document in every format: no blank lines or lone % inside.
    fortunes = [" ".join(f.split()) for f in fortunes]
    rng = random.Random(seed)
    serial = 0
    while True:
        words = (rng.choice(fortunes) + " " + rng.choice(fortunes)).split(" ")
        for _ in range(3):
            i = rng.randrange(len(words))
            for old, new in SWAPS:
                if words[i] == old:
                    words[i] = new
                    break
        serial += 1
        yield serial, f"{' '.join(words)} (no. {serial})"


def generate(out: Path, scale: float) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = documents(seed=0)
    made: dict[str, Any] = {}
    for fmt, (target, shards) in PLAN.items():
        per_shard = int(target * scale / shards)
        expanded = 0
        for shard in range(shards):
            path = out / f"part-{shard:04d}.{fmt}"
            size = 0
            if fmt in ("jsonl", "jsonl.gz"):
                with (gzip.open(path, "wt", encoding="utf-8", compresslevel=1)
                      if fmt == "jsonl.gz" else path.open("w", encoding="utf-8")) as f:
                    while size < per_shard:
                        n, text = next(docs)
                        line = json.dumps({"id": f"d{n}", "text": text, "team": "support",
                                           "priority": n % 3}) + "\n"
                        f.write(line)
                        size += len(line)
            elif fmt == "txt.zst":
                with path.open("wb") as raw, \
                        zstandard.ZstdCompressor(level=3).stream_writer(raw) as f:
                    while size < per_shard:
                        chunk = "".join(next(docs)[1] + "\n%\n" for _ in range(1000)).encode()
                        f.write(chunk)
                        size += len(chunk)
            elif fmt == "csv":
                with path.open("w", encoding="utf-8", newline="") as f:
                    writer = csv.writer(f)
                    writer.writerow(["id", "text", "team", "priority"])
                    while size < per_shard:
                        n, text = next(docs)
                        writer.writerow([f"d{n}", text, "wiki", n % 3])
                        size += len(text) + 24  # the other columns and the quoting
            else:
                schema = pa.schema([("id", pa.string()), ("text", pa.string()),
                                    ("views", pa.int64())])
                with pq.ParquetWriter(path, schema) as writer:
                    while size < per_shard:
                        rows = [next(docs) for _ in range(65536)]
                        texts = [t for _, t in rows]
                        size += sum(len(t) for t in texts)
                        writer.write_table(pa.table({
                            "id": [f"d{n}" for n, _ in rows], "text": texts,
                            "views": [n % 1000 for n, _ in rows]}, schema=schema))
            expanded += size
        stored = sum(p.stat().st_size for p in out.glob(GLOBS[fmt]))
        if fmt in ("jsonl", "csv"):
            expanded = stored
        made[fmt] = {"files": shards, "stored_bytes": stored, "expanded_bytes": expanded}
    return made


def vm_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def child(data: Path, spool: Path) -> None:
    """Runs in the measured process: read every format, print JSON."""
    import pyarrow.parquet  # noqa: F401 - counted in the baseline, as in a real run
    import s3fs  # noqa: F401
    import zstandard  # noqa: F401

    from services.data_prep.documents import DecisionLog
    from services.data_prep.sources import iter_documents

    baseline_kb = vm_rss_kb()
    log = DecisionLog()
    by_format: dict[str, Any] = {}
    for fmt, pattern in GLOBS.items():
        started = time.perf_counter()
        docs = chars = 0
        for doc in iter_documents(str(data / pattern), roots=[data], log=log, spool_dir=spool):
            docs += 1
            chars += len(doc.text)
        by_format[fmt] = {"docs": docs, "seconds": time.perf_counter() - started,
                          "text_chars": chars,
                          "peak_rss_so_far_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    print(json.dumps({"by_format": by_format, "dropped": log.dropped(),
                      "rss_after_imports_kb": baseline_kb}))


def run_child(*args: str) -> tuple[dict[str, Any], int]:
    """Run this module with `args` in a child; its last stdout line as JSON, and its own
    peak RSS in KiB (wait4, so no other child counts). The parent stays small: Linux
    carries the RSS high-water mark across fork and exec."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "libs")])}
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.dataprep.ingest", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{args[0]} child failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="input size multiplier")
    parser.add_argument("--dir", type=Path, help="where to generate (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated input")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.generate:
        print(json.dumps(generate(args.generate, args.scale)))
        return

    work = Path(args.dir or tempfile.mkdtemp(prefix="lmforge-ingest-"))
    data, spool = work / "data", work / "spool"
    data.mkdir(parents=True, exist_ok=True)
    spool.mkdir(exist_ok=True)
    try:
        started = time.perf_counter()
        made, _ = run_child("--generate", str(data), "--scale", str(args.scale))
        generate_s = time.perf_counter() - started
        load_before = os.getloadavg()[0]
        measured, peak_kb = run_child("--child", str(data), str(spool))
        load_after = os.getloadavg()[0]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    mb = 1 << 20
    formats = {}
    for fmt, m in measured["by_format"].items():
        secs = m["seconds"]
        formats[fmt] = {
            **made[fmt], "docs": m["docs"], "seconds": round(secs, 2),
            "peak_rss_so_far_mb": round(m["peak_rss_so_far_kb"] / 1024, 1),
            "docs_per_s": round(m["docs"] / secs),
            "mb_per_s_expanded": round(made[fmt]["expanded_bytes"] / mb / secs, 1),
            "mb_per_s_stored": round(made[fmt]["stored_bytes"] / mb / secs, 1)}
    seconds = sum(f["seconds"] for f in formats.values())
    docs = sum(f["docs"] for f in formats.values())
    stored = sum(f["stored_bytes"] for f in formats.values())
    expanded = sum(f["expanded_bytes"] for f in formats.values())
    result = {
        "benchmark": "dataprep_ingest",
        "input": {"files": sum(f["files"] for f in formats.values()),
                  "stored_mb": round(stored / mb), "expanded_mb": round(expanded / mb),
                  "generate_s": round(generate_s, 1)},
        "read": {"docs": docs, "seconds": round(seconds, 1),
                 "docs_per_s": round(docs / seconds),
                 "mb_per_s_expanded": round(expanded / mb / seconds, 1),
                 "mb_per_s_stored": round(stored / mb / seconds, 1),
                 "dropped": measured["dropped"]},
        "memory": {"peak_rss_mb": round(peak_kb / 1024, 1),
                   "rss_after_imports_mb": round(measured["rss_after_imports_kb"] / 1024, 1),
                   "reading_share_mb": round(
                       (peak_kb - measured["rss_after_imports_kb"]) / 1024, 1)},
        "by_format": formats,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "load_average_1m": [round(load_before, 1), round(load_after, 1)]},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
