"""The whole data-prep pipeline: docs/s, MB/s and peak RSS, on the 100k corpus and on >= 1 GB.

    python -m benchmarks.dataprep.pipeline [--inputs corpus large] [--large-gb 1.0]
        [--embedder model2vec|minilm|off] [--work /tmp/lmforge-bench/pipeline]
        [--out benchmarks/results/dataprep_pipeline.json]

What runs is `prepare.prepare_dataset` with the service's default settings
(`DataPrepSettings().prep_config()`: read, clean, quality, PII, near-dup, split,
semantic, tokenizer, pack), each input in its own child process so its peak RSS
(`ru_maxrss` from wait4) is the pipeline's alone; the child samples its RSS every
0.5 s too, for each phase's peak (`phases_peak_rss_mb`).

Inputs:

- `corpus`: the planted 100k-document corpus of benchmarks/dataprep/corpus.py
  (real Debian texts, a quarter Chinese, 6,000 planted near-duplicate pairs), as
  one JSONL file of ~37 MB;
- `large`: >= `--large-gb` GB of JSONL made from the same real texts: each
  document is 4-12 lines (sentences, dictionary lines, poem lines) drawn at random
  from the corpus's 1.3M distinct lines, so the documents are new and distinct
  (near-dup finds almost nothing) while every line is real text; 5 shards.

The embedder, per input (`--embedder corpus=model2vec large=model2vec`, the
default): the packaged MiniLM is the pipeline's default but embeds ~30-50 chunks/s
on 2 cores, so the 100k corpus (~110k chunks) would spend most of an hour in it
and 1 GB (~1.5M chunks) about half a day. The runs use the model2vec static model
distilled from that same MiniLM (~8,000 chunks/s; benchmarks/dataprep/index.py
measured its trade), which data-prep allows for long-tail weights and search only
(its cosines cannot tell a paraphrase from unrelated text, so decontamination is
off: the semantic config refuses model2vec with it). What MiniLM would add is
measured beside it, not guessed: `--minilm-sample` chunks of the same input are
embedded with MiniLM in the same run, and the JSON gives its chunks/s and the
seconds the run's `semantic.chunks_embedded` would take at that rate.
`--embedder corpus=minilm` runs the default for real; `off` runs without the
semantic stage. The JSON names what ran.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path("/tmp/lmforge-bench/near-dup-corpus")


def corpus_input(corpus_dir: Path) -> Path:
    """The planted corpus's JSONL, built first if absent."""
    path = corpus_dir / "corpus.jsonl"
    if not path.exists():
        from benchmarks.dataprep.corpus import build_corpus

        build_corpus(corpus_dir)
    return path


def large_input(corpus: Path, out: Path, gigabytes: float, seed: int = 0) -> Path:
    """>= `gigabytes` of JSONL documents recombined from the corpus's distinct lines."""
    done = out / "DONE"
    if done.exists() and json.loads(done.read_text())["gigabytes"] >= gigabytes:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.jsonl"):
        old.unlink()
    lines: set[str] = set()
    with corpus.open(encoding="utf-8") as f:
        for row in f:
            for line in json.loads(row)["text"].splitlines():
                line = line.strip()
                if len(line) >= 20:
                    lines.add(line)
    pool = sorted(lines)
    rng = random.Random(seed)
    target = int(gigabytes * 1e9)
    shards = 5
    written = docs = 0
    files = [(out / f"part-{i}.jsonl").open("w", encoding="utf-8") for i in range(shards)]
    try:
        while written < target:
            text = "\n".join(rng.choice(pool) for _ in range(rng.randint(4, 12)))
            row = json.dumps({"id": f"large-{docs:08d}", "text": text}, ensure_ascii=False) + "\n"
            files[docs % shards].write(row)
            written += len(row.encode())
            docs += 1
    finally:
        for f in files:
            f.close()
    done.write_text(json.dumps({"gigabytes": gigabytes, "bytes": written, "docs": docs,
                                "distinct_lines": len(pool)}))
    return out


def embedder_name(kind: str, work: Path) -> str | None:
    if kind == "off":
        return None
    if kind == "minilm":
        return "minilm"
    from services.data_prep.semantic import distill_static_model

    directory = work / "model2vec-minilm"
    if not (directory / "config.json").exists():
        distill_static_model(directory)
    return f"model2vec:{directory}"


def minilm_rate(corpus: Path, sample: int) -> float:
    """MiniLM chunks/s on `sample` chunks of the corpus (data-prep's chunking), here."""
    from services.data_prep.semantic import MiniLMEmbedder, chunk_text

    chunks: list[str] = []
    with corpus.open(encoding="utf-8") as f:
        for row in f:
            chunks.extend(chunk_text(json.loads(row)["text"]))
            if len(chunks) >= sample:
                break
    embedder = MiniLMEmbedder()
    embedder.encode(chunks[:32])  # warm
    started = time.perf_counter()
    embedder.encode(chunks[:sample])
    return sample / (time.perf_counter() - started)


class RssSampler:
    """The process's resident set every `interval` seconds, in a thread, so each phase's
    peak can be told apart (`ru_maxrss` is the whole run's)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                resident = int(f.read().split()[1]) * self._page
            self.samples.append((time.perf_counter(), resident))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def phase_peaks_mb(self, started: float, phases_s: dict[str, float]) -> dict[str, float]:
        """Peak RSS (MB) in each phase; `phases_s` are the phases' seconds, in order."""
        peaks: dict[str, float] = {}
        end = started
        for phase, seconds in phases_s.items():
            begin, end = end, end + seconds
            inside = [rss for t, rss in self.samples if begin <= t < end]
            if inside:
                peaks[phase] = round(max(inside) / 2**20, 1)
        return peaks


def child(source: str, out_dir: Path, embedder: str) -> None:
    """Runs in the measured process: the pipeline over `source`, JSON on stdout."""
    from dataclasses import replace

    from services.data_prep.prepare import prepare_dataset
    from services.data_prep.settings import DataPrepSettings

    config = DataPrepSettings(dataprep_semantic=embedder != "off").prep_config()
    if config.semantic is not None:
        static = embedder.startswith("model2vec:")
        config.semantic = replace(config.semantic, embedder=embedder,
                                  decontaminate=config.semantic.decontaminate and not static)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with RssSampler() as sampler:
        stats = prepare_dataset(source, "", "", out_dir, config, roots=["/"], timings=timings)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "phases_s": timings,
                      "phases_peak_rss_mb": sampler.phase_peaks_mb(started, timings),
                      "stats": stats.as_flat_dict()}))


def measure(source: str, input_bytes: int, out_dir: Path, embedder: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "libs")])}
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.dataprep.pipeline", "--child",
                             source, str(out_dir), embedder],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the pipeline over {source} failed (exit {status})")
    result = json.loads(output.strip().splitlines()[-1])
    stats = result["stats"]
    seconds = result["seconds"]
    return {
        "input_bytes": input_bytes,
        "records_read": stats["records_read"],
        "records_kept": stats["records_kept"],
        "seconds": round(seconds, 1),
        "docs_per_s": round(stats["records_read"] / seconds, 1),
        "mb_per_s": round(input_bytes / 1e6 / seconds, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "phases_s": result["phases_s"],
        "phases_peak_rss_mb": result["phases_peak_rss_mb"],
        "train_tokens": stats["train_tokens"],
        "dropped": stats["dropped"],
        "tallies": stats["tallies"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", nargs="+", choices=["corpus", "large"],
                        default=["corpus", "large"])
    parser.add_argument("--large-gb", type=float, default=1.0)
    parser.add_argument("--embedder", nargs="+",
                        default=["corpus=model2vec", "large=model2vec"],
                        help="INPUT=minilm|model2vec|off per input")
    parser.add_argument("--minilm-sample", type=int, default=800,
                        help="chunks embedded with MiniLM to measure what it would add")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmforge-bench/pipeline"))
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks/results/dataprep_pipeline.json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.child[2])
        return
    args.work.mkdir(parents=True, exist_ok=True)
    corpus = corpus_input(args.corpus)
    embedders = dict(item.split("=", 1) for item in args.embedder)
    report: dict[str, Any] = {"settings": "DataPrepSettings() defaults: quality, PII, "
                              "near-dup 0.7, semantic (decontamination with MiniLM, long-tail "
                              "cap 3), BPE 4096", "cpus": os.cpu_count()}
    for name in args.inputs:
        kind = embedders.get(name, "minilm")
        embedder = embedder_name(kind, args.work) or "off"
        if name == "corpus":
            source, size = str(corpus), corpus.stat().st_size
        else:
            directory = large_input(corpus, args.work / "large", args.large_gb)
            source = str(directory / "*.jsonl")
            size = sum(p.stat().st_size for p in directory.glob("*.jsonl"))
        out_dir = args.work / f"out-{name}"
        if out_dir.exists():
            import shutil

            shutil.rmtree(out_dir)
        report[name] = {"embedder": kind, "decontamination": kind == "minilm",
                        **measure(source, size, out_dir, embedder)}
        if kind == "model2vec" and args.minilm_sample:
            rate = minilm_rate(corpus, args.minilm_sample)
            chunks = report[name]["tallies"].get("semantic.chunks_embedded", 0)
            report[name]["minilm_would_add"] = {
                "sample_chunks": args.minilm_sample, "minilm_chunks_per_s": round(rate, 1),
                "chunks_embedded": chunks, "seconds": round(chunks / rate, 1)}
        print(json.dumps({name: report[name]}), file=sys.stderr, flush=True)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
