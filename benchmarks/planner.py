"""The planner on the shipped catalog, and its models against measured runs.

1. For 124M / 350M / 1B / 7B Llama models, each trained on 2B tokens (one epoch,
   sequence 2048, vocabulary 32000, a global batch of 256 sequences = 0.5M tokens)
   within a 24-hour budget, the plan the planner chooses over the whole catalog,
   against the naive plan: on-demand, the largest GPU (most memory), no ZeRO or
   offload and no torch.compile (plain data parallel, the cheapest count of it).
2. The throughput and memory models against the H200 measurements in
   benchmarks/results/train_gpu*.json (one device, bf16): predicted vs measured
   tokens/s and peak memory, per run, with the error. The catalog's H200
   efficiency and compile speed-up were taken from the 1B eager/compiled runs, so
   those two points are in-sample; the rest are not fitted.

    python benchmarks/planner.py [--out benchmarks/results/planner.json]

Prints JSON; pure arithmetic (no torch, no GPU), a second or so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from lmforge.catalog import load_catalog
from lmforge.presets import PRESETS
from services.scheduler import planner
from services.scheduler.memory_model import GIB, Parallelism, estimate_memory
from services.scheduler.planner import Option, PlanRequest, plan_training
from services.scheduler.throughput_model import step_time

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("124m", "350m", "1b", "7b")
TOKENS, SEQ, VOCAB, GLOBAL_BATCH, BUDGET_H = 2_000_000_000, 2048, 32000, 256, 24.0
MEASURED_DEVICE = "coreweave-h200"


@contextlib.contextmanager
def without_zero() -> Iterator[None]:
    """The naive plan's layouts: the plain engine only."""
    saved = planner.LAYOUTS
    planner.LAYOUTS = ((0, False, False),)
    try:
        yield
    finally:
        planner.LAYOUTS = saved


def summary(option: Option) -> dict:
    p = option.parallelism
    return {"type": option.instance.name, "count": option.count, "market": option.market,
            "layout": option.describe(), "zero_stage": p.zero_stage,
            "hours": round(option.seconds / 3600, 2), "usd": round(option.usd, 2),
            "complete": option.complete, "trained_share": round(
                option.max_steps / option.steps_needed, 3),
            "checkpoint_interval_s_young_daly": round(option.checkpoint_interval_s, 1),
            "headroom_gib": round(option.headroom_gib, 1)}


def plans() -> dict:
    catalog = load_catalog()
    everything = list(catalog.types.values())
    gpus = [t for t in everything if t.device == "cuda"]
    largest = max(gpus, key=lambda t: t.memory_gib)
    out = {}
    for size in SIZES:
        request = PlanRequest(train_tokens=TOKENS, vocab_size=VOCAB, seq_len=SEQ,
                              time_budget_s=BUDGET_H * 3600, preset=size,
                              global_batch=GLOBAL_BATCH, epochs=1.0)
        chosen = plan_training(request, everything).plan.option
        with without_zero():
            naive = plan_training(replace(request, market="on-demand", compile="off"),
                                  [largest]).plan.option
        out[size] = {"chosen": summary(chosen), "naive": summary(naive),
                     "usd_saving": round(1 - chosen.usd / naive.usd, 3) if naive.usd else None,
                     "hours_ratio": round(chosen.seconds / naive.seconds, 3)}
    return out


def model_errors() -> dict:
    instance = load_catalog().types[MEASURED_DEVICE]
    rows = []
    for path in sorted((ROOT / "benchmarks/results").glob("train_gpu*.json")):
        data = json.loads(path.read_text())
        for r in data["results"]:
            preset = PRESETS[r["size"]]
            mode = r["mode"]
            stage = int(mode[4]) if mode.startswith("zero") else 0
            par = Parallelism(engine="deepspeed" if stage else "plain", zero_stage=stage)
            step = step_time(instance, preset, parameters=r["parameters"], vocab_size=VOCAB,
                             seq_len=r["seq_len"], micro_batch=r["micro_batch"], grad_accum=1,
                             precision="bf16", compiled=mode.endswith("compiled"),
                             parallelism=par)
            predicted = r["micro_batch"] * r["seq_len"] / step.total_s
            memory = estimate_memory(r["parameters"], preset, micro_batch=r["micro_batch"],
                                     seq_len=r["seq_len"], vocab_size=VOCAB, parallelism=par)
            rows.append({"file": path.name, "size": r["size"], "mode": mode,
                         "micro_batch": r["micro_batch"],
                         "measured_tokens_per_s": r["tokens_per_s"],
                         "predicted_tokens_per_s": round(predicted, 1),
                         "throughput_error": round(predicted / r["tokens_per_s"] - 1, 3),
                         "measured_peak_gib": r["peak_memory_gib"],
                         "predicted_gib": round(memory.total_bytes / GIB, 2),
                         "memory_error": round(memory.total_bytes / GIB
                                               / r["peak_memory_gib"] - 1, 3)})
    errors = [abs(r["throughput_error"]) for r in rows]
    return {"device": MEASURED_DEVICE, "runs": rows,
            "throughput_mean_abs_error": round(statistics.mean(errors), 3),
            "throughput_max_abs_error": round(max(errors), 3),
            "memory_mean_error": round(statistics.mean(r["memory_error"] for r in rows), 3),
            "memory_underestimates": sum(r["memory_error"] < 0 for r in rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/planner.json")
    args = parser.parse_args()
    report = {"benchmark": "planner",
              "request": {"tokens": TOKENS, "seq_len": SEQ, "vocab_size": VOCAB,
                          "global_batch": GLOBAL_BATCH, "budget_hours": BUDGET_H},
              "plans": plans(), "models_vs_h200": model_errors()}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
