"""Every data-prep figure of issue 10 in one run, side by side, as one JSON document.

    python -m benchmarks.data_prep [--skip scale ...] [--out benchmarks/results/data_prep.json]

Runs, one after another in child processes (so one's memory never counts in
another's), the benchmarks under benchmarks/dataprep/ — each documents its own
method —, then prints a summary of every figure with its target and baseline:

- near_dup: recall per Jaccard band and precision on the planted 100k corpus (6,000
  pairs, a quarter Chinese), docs/s for lmforge and for datasketch MinHashLSH (bulk
  and per-shingle) at the same threshold and permutations;
- pii: span precision and recall overall and per type, on the labelled set and the
  challenge set;
- pipeline: the whole pipeline's docs/s, MB/s and peak RSS on the 100k corpus and
  on >= 1 GB;
- ingest: reading >= 1 GB in every format: docs/s, MB/s, peak RSS;
- index: embedding chunks/s (MiniLM, model2vec), recall@10 and ms/query of the
  index on 200k real-text embeddings, build time;
- long_tail: sampled exposure of the rarest decile of clusters over its natural
  share;
- scale: IVF-PQ over 10M vectors: build time, memory, ms/query, recall@10 (~15
  minutes on 2 cores; `--skip scale` to leave it out).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# name -> (module, arguments; "{out}" is replaced by the JSON file the child writes)
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "near_dup": ("benchmarks.dataprep.near_dup", ["--save", "{out}"]),
    "pii": ("benchmarks.dataprep.pii", []),
    "pipeline": ("benchmarks.dataprep.pipeline", ["--out", "{out}"]),
    "ingest": ("benchmarks.dataprep.ingest", ["--out", "{out}"]),
    "index": ("benchmarks.dataprep.index", ["--out", "{out}"]),
    "long_tail": ("benchmarks.dataprep.long_tail", ["--out", "{out}"]),
    "scale": ("benchmarks.dataprep.scale", ["--out", "{out}"]),
}


def run(name: str, work: Path, extra: list[str]) -> dict[str, Any]:
    module, arguments = BENCHMARKS[name]
    arguments = [*arguments, *extra]
    out = work / f"{name}.json"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "libs")])}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", module,
                           *(a.replace("{out}", str(out)) for a in arguments)],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmark {name} ({module}) failed with exit code {done.returncode}")
    if out.exists():
        result = json.loads(out.read_text())
    else:  # prints its JSON instead of writing it
        text = done.stdout
        result = json.loads(text[text.index("{"):])
    result["_wall_s"] = round(time.perf_counter() - started, 1)
    return result


def _check(value: float | None, target: str, ok: bool | None) -> dict[str, Any]:
    return {"value": value, "target": target, "met": ok}


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's figures, each with its target, pulled from the benchmarks' JSON."""
    summary: dict[str, Any] = {}
    if nd := results.get("near_dup"):
        lm, bulk, update = nd["lmforge"], nd["datasketch_bulk"], nd["datasketch_update"]
        summary["near_dup"] = {
            "recall_j_ge_0.7": _check(lm["recall_j_ge_0.7"], ">= 0.90",
                                      lm["recall_j_ge_0.7"] >= 0.90),
            "precision": _check(lm["precision"], ">= 0.95", lm["precision"] >= 0.95),
            "recall_by_band": {band: r["recall"] for band, r in lm["recall"].items()},
            "docs_per_s": {"lmforge": lm["docs_per_s"], "datasketch_bulk": bulk["docs_per_s"],
                           "datasketch_per_shingle": update["docs_per_s"]},
            "speedup_vs_datasketch_bulk": _check(nd["speedup_vs_datasketch_bulk"], ">= 2x",
                                                 nd["speedup_vs_datasketch_bulk"] >= 2),
            "speedup_vs_datasketch_per_shingle": nd["speedup_vs_datasketch_update"],
            "datasketch_recall_j_ge_0.7": bulk["recall_j_ge_0.7"],
            "datasketch_precision": bulk["precision"],
        }
    if pii := results.get("pii"):
        sets = {}
        for name, s in pii["sets"].items():
            overall = s["overall"]
            sets[name] = {
                "precision": _check(overall["precision"], ">= 0.97", overall["precision"] >= 0.97),
                "recall": _check(overall["recall"], ">= 0.95", overall["recall"] >= 0.95),
                "per_type": {t: {"precision": v["precision"], "recall": v["recall"],
                                 "support": v["support"]}
                             for t, v in s["per_type"].items() if v["support"]},
            }
        summary["pii"] = {"sets": sets, "speed": pii.get("speed")}
    if pipe := results.get("pipeline"):
        keys = ("embedder", "decontamination", "input_bytes", "records_read", "docs_per_s",
                "mb_per_s", "peak_rss_mb", "seconds", "phases_s", "minilm_would_add")
        summary["pipeline"] = {name: {k: pipe[name][k] for k in keys if k in pipe[name]}
                               for name in ("corpus", "large") if name in pipe}
    if ing := results.get("ingest"):
        summary["ingest"] = {"expanded_mb": ing["input"]["expanded_mb"],
                             "docs_per_s": ing["read"]["docs_per_s"],
                             "mb_per_s_expanded": ing["read"]["mb_per_s_expanded"],
                             "peak_rss_mb": ing["memory"]["peak_rss_mb"]}
    if idx := results.get("index"):
        chosen = idx["chosen"]
        embedding = idx["embedding"]
        summary["index"] = {
            "vectors": idx["text"]["indexed_chunks"],
            "recall_at_10": _check(chosen["recall_at_10"], ">= 0.95",
                                   chosen["recall_at_10"] >= 0.95),
            "ms_per_query": _check(chosen["ms_per_query_single_median"], "<= 1 ms",
                                   chosen["ms_per_query_single_median"] <= 1.0),
            "build_s": chosen["build_s"],
            "chunks_per_s": {"minilm": embedding["minilm"]["chunks_per_s"],
                             "model2vec": embedding["model2vec_distilled_from_minilm"][
                                 "chunks_per_s"]},
        }
    if lt := results.get("long_tail"):
        sampled = lt["weighting"]["from_tokens"]["samplers"]
        summary["long_tail"] = {
            seq: _check(s["trainer_weighted"]["rarest_decile_exposure"], "2.5-3.0",
                        2.5 <= s["trainer_weighted"]["rarest_decile_exposure"] <= 3.0)
            for seq, s in sampled.items()}
    if sc := results.get("scale"):
        best = next(s for s in sc["search"] if s["nprobe"] == sc["default_nprobe"])
        summary["scale"] = {
            "vectors": sc["vectors"], "build_s": sc["build_s"],
            "peak_rss_gib": _check(sc["peak_rss_gib"], "<= 8 GiB", sc["peak_rss_gib"] <= 8),
            "ms_per_query": _check(best["ms_per_query_single_median"], "<= 10 ms",
                                   best["ms_per_query_single_median"] <= 10),
            "recall_at_10": _check(best["recall_at_10"], ">= 0.9", best["recall_at_10"] >= 0.9),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=list(BENCHMARKS))
    parser.add_argument("--only", nargs="*", choices=list(BENCHMARKS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/data_prep.json")
    parser.add_argument("--with", dest="extra", action="append", default=[],
                        metavar="NAME=ARGS", help="more arguments for one benchmark, e.g. "
                        "--with 'pipeline=--inputs corpus' --with 'index=--minilm-chunks 2000'")
    args = parser.parse_args()
    extra: dict[str, list[str]] = {}
    for item in args.extra:
        name, _, rest = item.partition("=")
        if name not in BENCHMARKS:
            parser.error(f"--with {item!r}: no benchmark {name!r}")
        extra.setdefault(name, []).extend(shlex.split(rest))
    names = [n for n in (args.only or BENCHMARKS) if n not in args.skip]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="lmforge-data-prep-bench-") as tmp:
        for name in names:
            print(f"data_prep benchmark: {name} ...", file=sys.stderr, flush=True)
            results[name] = run(name, Path(tmp), extra.get(name, []))
    report = {"benchmark": "data_prep", "cpus": os.cpu_count(), "ran": names,
              "arguments": extra, "load_average_at_end": os.getloadavg(),
              "summary": summarize(results), "details": results}
    text = json.dumps(report, indent=1, ensure_ascii=False)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
