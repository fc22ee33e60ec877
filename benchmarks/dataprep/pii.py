"""PII scrub: span-level precision and recall on the labelled sets, and speed.

A detection counts as a true positive only when its start, end and type are
exactly those of a labelled span; anything else it finds is a false positive
(a near-miss it hits, or a span with the wrong boundaries or type), and every
labelled span not found exactly is a false negative. Near-misses (order
numbers, dates, versions, Luhn-failing numbers, IDs with a wrong check digit,
...) are also reported as the share left untouched.

Speed: docs/s over the labelled set (PII in every document) and over the
shipped fortunes sample (ordinary prose, almost no PII), one process.

    python benchmarks/dataprep/pii.py [--labelled FILE.jsonl ...] [--repeat 5]

Figures (2 shared cores; the speed varies with the load):

| set        | spans | precision | recall | near-misses untouched | first score       |
| ---------- | ----: | --------: | -----: | --------------------: | ----------------- |
| labelled   |   534 |     1.000 |  1.000 |             361 / 361 | 0.967 / 0.888     |
| challenge  |    44 |     1.000 |  1.000 |               38 / 38 | 0.864 / 0.864     |

("first score": the labelled set's first run; the challenge set scored once
before the fixes it prompted.)

Every type is at 1.000 / 1.000 on both sets. The challenge set's last two
misses (a score "3.5.2.1" read as an address; an ID with a birth year of
1880, which GB 11643 allows, refused by a date check starting at 1900) were
fixed after it was scored, so it no longer measures unseen formats.
Speed: 17,000-35,000 docs/s (2.7-5.4 MB/s) on the fortunes prose, 6,800-10,700
docs/s on the PII-dense sets.

Two sets by default: tests/data/pii/labelled.jsonl (templated, 534 spans,
written before the detector) and tests/data/pii/challenge.jsonl (64
hand-written cases in formats the templates lack, written after it).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from services.data_prep.pii import PII_TYPES, find_pii

REPO = Path(__file__).resolve().parents[2]


def _ratio(a: int, b: int) -> float:
    return round(a / b, 4) if b else 1.0


def evaluate(docs: list[dict[str, Any]]) -> dict[str, Any]:
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    kind_found: Counter[str] = Counter()
    kind_total: Counter[str] = Counter()
    near_hit: Counter[str] = Counter()
    near_total: Counter[str] = Counter()
    errors: list[dict[str, Any]] = []
    for doc in docs:
        text = doc["text"]
        gold = {(s["start"], s["end"], s["type"]): s["kind"] for s in doc["spans"]}
        found = {(s.start, s.end, s.type): s.kind for s in find_pii(text)}
        for key, kind in gold.items():
            kind_total[kind] += 1
            if key in found:
                tp[key[2]] += 1
                kind_found[kind] += 1
            else:
                fn[key[2]] += 1
                errors.append({"id": doc["id"], "missed": text[key[0]:key[1]], "type": key[2],
                               "kind": kind})
        for key, kind in found.items():
            if key not in gold:
                fp[key[2]] += 1
                errors.append({"id": doc["id"], "false_positive": text[key[0]:key[1]],
                               "type": key[2], "kind": kind})
        for near in doc["near_misses"]:
            near_total[near["kind"]] += 1
            if any(s < near["end"] and near["start"] < e for s, e, _ in found):
                near_hit[near["kind"]] += 1
    per_type = {
        t: {"precision": _ratio(tp[t], tp[t] + fp[t]), "recall": _ratio(tp[t], tp[t] + fn[t]),
            "support": tp[t] + fn[t], "false_positives": fp[t], "false_negatives": fn[t]}
        for t in PII_TYPES}
    all_tp, all_fp, all_fn = sum(tp.values()), sum(fp.values()), sum(fn.values())
    return {
        "overall": {"precision": _ratio(all_tp, all_tp + all_fp),
                    "recall": _ratio(all_tp, all_tp + all_fn), "support": all_tp + all_fn,
                    "false_positives": all_fp, "false_negatives": all_fn},
        "per_type": per_type,
        "recall_per_kind": {k: _ratio(kind_found[k], n) for k, n in sorted(kind_total.items())},
        "near_misses": {"total": sum(near_total.values()), "hit": sum(near_hit.values()),
                        "untouched": _ratio(sum(near_total.values()) - sum(near_hit.values()),
                                            sum(near_total.values())),
                        "hit_per_kind": {k: near_hit[k] for k in sorted(near_hit)}},
        "errors": errors,
    }


def throughput(texts: list[str], repeat: int) -> dict[str, float]:
    find_pii(texts[0])  # compile and warm
    start = time.perf_counter()
    for _ in range(repeat):
        for text in texts:
            find_pii(text)
    seconds = time.perf_counter() - start
    n_bytes = sum(len(t.encode()) for t in texts) * repeat
    return {"docs_per_s": round(len(texts) * repeat / seconds),
            "mb_per_s": round(n_bytes / seconds / 1e6, 2)}


def describe(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"documents": len(docs), "pii_spans": sum(len(d["spans"]) for d in docs),
            "types": len({s["type"] for d in docs for s in d["spans"]}),
            "kinds": len({s["kind"] for d in docs for s in d["spans"]}),
            "near_misses": sum(len(d["near_misses"]) for d in docs),
            "languages": dict(Counter(d["lang"] for d in docs))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labelled", type=Path, nargs="+",
                        default=[REPO / "tests/data/pii/labelled.jsonl",
                                 REPO / "tests/data/pii/challenge.jsonl"])
    parser.add_argument("--prose", type=Path, default=REPO / "tests/data/fortunes-sample.txt")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sets: dict[str, Any] = {}
    texts: list[str] = []
    for path in args.labelled:
        lines = path.read_text(encoding="utf-8").splitlines()
        docs = [json.loads(line) for line in lines]
        sets[path.stem] = {"set": describe(docs), **evaluate(docs)}
        texts += [d["text"] for d in docs]
    prose = [d.strip() for d in args.prose.read_text(encoding="utf-8").split("\n%\n")
             if d.strip()]
    print(json.dumps({
        "benchmark": "pii",
        "sets": sets,
        "speed": {"labelled_sets": throughput(texts, args.repeat),
                  "fortunes_prose": throughput(prose, args.repeat)},
    }, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
