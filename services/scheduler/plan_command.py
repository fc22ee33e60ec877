"""`lmforge plan`: the scheduler's planner over the whole catalog, without a run.

    python -m services.scheduler.plan_command DATA --model-size 1b --budget-hours 4
        [--budget-usd 50] [--types gcp-t4,aws-p5-h100] [--tokens N] [--json]

The CLI runs this module (the CLI imports no service). It estimates the
training tokens from the data's size (bytes / --bytes-per-token, said in the
output; --tokens gives the exact figure), reads the measured throughput that
trainers stored in NATS (when lmforge is up; said when it is not) and prints the
ranked options with hours, dollars, memory headroom and the Young/Daly
checkpoint interval, then why the others were refused.

Exit codes: 0 a plan, 1 no plan fits (the reasons are printed), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lmforge.calibration import Calibration
from lmforge.catalog import CatalogError, load_catalog
from lmforge.contracts.names import Bucket
from lmforge.presets import PRESETS
from lmforge.settings import PlatformSettings, load_settings
from services.scheduler.memory_model import GIB
from services.scheduler.planner import (
    DEFAULT_EPOCHS,
    Option,
    PlanError,
    PlanReport,
    PlanRequest,
    plan_training,
)

EXIT_NO_PLAN, EXIT_USAGE = 1, 2


def data_bytes(data: str) -> int:
    """Bytes of a file, a directory's files, or a glob's."""
    path = Path(data).expanduser()
    if path.is_file():
        return path.stat().st_size
    files = path.rglob("*") if path.is_dir() else Path("/").glob(str(path.absolute())[1:])
    return sum(f.stat().st_size for f in files if f.is_file())


async def _read_calibrations(nats_url: str) -> dict[str, Calibration]:
    from lmforge.bus import ensure_kv
    from lmforge.cli.runs import connect_nats

    nc = await connect_nats(nats_url, timeout_s=2.0, reconnect=False)
    try:
        kv = await ensure_kv(nc.jetstream(), Bucket.THROUGHPUT)
        try:
            keys = list(await kv.keys())
        except Exception:  # nats-py raises NoKeysError for an empty bucket
            keys = []
        found = {}
        for key in keys:
            entry = await kv.get(key)
            if entry.value:
                found[key] = Calibration.from_json(entry.value)
        return found
    finally:
        await nc.close()


def read_calibrations(settings: PlatformSettings) -> tuple[dict[str, Calibration], str]:
    """The measured throughputs in NATS, and a line saying where they came from."""
    from lmforge.cli.up import read_state

    state = read_state(settings.home)
    url = state["nats_url"] if state else settings.nats_url
    try:
        found = asyncio.run(_read_calibrations(url))
    except (ConnectionError, OSError, TimeoutError) as exc:
        return {}, f"no measured throughput: NATS at {url} unreachable ({exc}); catalog figures"
    return found, f"{len(found)} measured throughput(s) from NATS at {url}"


def option_json(option: Option) -> dict[str, Any]:
    p = option.parallelism
    return {
        "instance_type": option.instance.name, "count": option.count,
        "market": option.market, "engine": p.engine, "zero_stage": p.zero_stage,
        "offload_optimizer": p.offload_optimizer, "offload_params": p.offload_params,
        "gradient_checkpointing": p.gradient_checkpointing, "precision": option.precision,
        "compile": option.compiled, "micro_batch": option.micro_batch,
        "grad_accum": option.grad_accum, "steps": option.max_steps,
        "steps_needed": option.steps_needed, "complete": option.complete,
        "hours": option.seconds / 3600, "usd": option.usd,
        "usd_per_hour": option.price_per_hour,
        "memory_gib": option.memory.total_bytes / GIB, "headroom_gib": option.headroom_gib,
        "flops_per_device": option.step.flops_per_device,
        "throughput_source": option.step.source,
        "step_seconds": option.step.total_s,
        "checkpoint_cost_s": option.checkpoint_cost_s,
        "checkpoint_interval_steps": option.checkpoint_interval,
        "checkpoint_interval_s_young_daly": option.checkpoint_interval_s,
        "preemptions_per_hour": option.instance.preemptions_per_hour(option.market),
    }


def report_json(report: PlanReport, request: PlanRequest, notes: list[str]) -> dict[str, Any]:
    return {
        "request": {"model_size": request.preset, "train_tokens": request.train_tokens,
                    "tokens_to_train": report.tokens_requested, "epochs": request.epochs,
                    "budget_hours": request.time_budget_s / 3600 or None,
                    "budget_usd": request.budget_usd or None,
                    "parameters": report.plan.parameters},
        "chosen": option_json(report.plan.option),
        "ranked": [option_json(o) for o in report.ranked],
        "refused": [{"option": r.label, "reason": r.reason} for r in report.refused],
        "note": report.note, "notes": notes,
    }


def print_report(report: PlanReport, notes: list[str], console: Console) -> None:
    for line in notes:
        console.print(f"[dim]{line}[/]")
    table = Table(title=f"{report.plan.preset.name} "
                  f"({report.plan.parameters / 1e6:.0f}M parameters), "
                  f"{report.tokens_requested:,} tokens")
    for column in ("#", "type", "n", "market", "layout", "hours", "$", "headroom GiB",
                   "checkpoint every", "throughput"):
        table.add_column(column)
    for rank, o in enumerate(report.ranked, 1):
        interval = (f"{o.checkpoint_interval} steps (Young/Daly {o.checkpoint_interval_s:.0f} s)"
                    if o.checkpoint_interval_s else f"{o.checkpoint_interval} steps")
        table.add_row(str(rank), o.instance.name, str(o.count), o.market, o.describe(),
                      f"{o.seconds / 3600:.2f}", f"{o.usd:,.2f}", f"{o.headroom_gib:.1f}",
                      interval, f"{o.step.flops_per_device / 1e12:.2f} TFLOP/s "
                      f"({o.step.source})")
    console.print(table)
    if report.note:
        console.print(f"[yellow]{report.note}[/]")
    if report.refused:
        refused = Table(title="refused")
        refused.add_column("option")
        refused.add_column("why")
        for r in report.refused:
            refused.add_row(r.label, r.reason)
        console.print(refused)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="the dataset (file, directory or glob) to size the run")
    parser.add_argument("--model-size", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--budget-hours", type=float, default=0.0, help="wall-clock budget")
    parser.add_argument("--budget-usd", type=float, default=0.0, help="dollar budget")
    parser.add_argument("--types", default="", help="comma-separated catalog types "
                        "(default: every type in the catalog)")
    parser.add_argument("--tokens", type=int, default=0,
                        help="training tokens (default: estimated from the data's bytes)")
    parser.add_argument("--bytes-per-token", type=float, default=4.0,
                        help="for the estimate: ~4 for English with a BPE tokenizer")
    parser.add_argument("--epochs", type=float, default=DEFAULT_EPOCHS)
    parser.add_argument("--seq-len", type=int, default=128,
                        help="context length (data-prep's LMFORGE_DATAPREP_SEQ_LEN)")
    parser.add_argument("--vocab-size", type=int, default=4096,
                        help="vocabulary (data-prep's LMFORGE_DATAPREP_VOCAB_SIZE)")
    parser.add_argument("--global-batch", type=int, default=0,
                        help="sequences per optimizer step (default: the preset's)")
    parser.add_argument("--family", choices=("llama", "qwen2"), default="llama")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="")
    parser.add_argument("--compile", choices=("on", "off"), default="")
    parser.add_argument("--market", choices=("spot", "on-demand"), default="")
    parser.add_argument("--micro-batch", type=int, default=0)
    parser.add_argument("--grad-accum", type=int, default=0)
    parser.add_argument("--no-calibration", action="store_true",
                        help="ignore the throughput trainers measured (catalog figures only)")
    parser.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    settings = load_settings(PlatformSettings)
    notes: list[str] = []
    try:
        catalog = load_catalog(settings.catalog)
        types = catalog.select([t.strip() for t in args.types.split(",") if t.strip()])
    except CatalogError as exc:
        console.print(f"[red]{exc}[/]")
        return EXIT_USAGE
    notes.append(f"catalog: {catalog.origin}")
    tokens = args.tokens
    if not tokens:
        size = data_bytes(args.data)
        if not size:
            console.print(f"[red]{args.data} has no data to size the run by; give --tokens[/]")
            return EXIT_USAGE
        tokens = int(size / args.bytes_per_token)
        notes.append(f"training tokens estimated from {size:,} bytes at "
                     f"{args.bytes_per_token:g} bytes/token: {tokens:,} (give --tokens for "
                     "the prepared dataset's exact count)")
    calibrations: dict[str, Calibration] = {}
    if args.no_calibration:
        notes.append("measured throughput ignored (--no-calibration): catalog figures")
    else:
        calibrations, line = read_calibrations(settings)
        notes.append(line)
    request = PlanRequest(
        train_tokens=tokens, vocab_size=args.vocab_size, seq_len=args.seq_len,
        time_budget_s=args.budget_hours * 3600, budget_usd=args.budget_usd,
        preset=args.model_size, family=args.family, precision=args.precision,
        compile=args.compile, micro_batch=args.micro_batch, grad_accum=args.grad_accum,
        global_batch=args.global_batch, epochs=args.epochs, market=args.market,
        instance_types=tuple(t.name for t in types))
    try:
        report = plan_training(request, types, calibrations)
    except PlanError as exc:
        if args.json:
            print(json.dumps({"error": str(exc), "notes": notes}))
        console.print(f"[red]no plan:[/] {exc}", soft_wrap=True)
        return EXIT_NO_PLAN
    if args.json:
        print(json.dumps(report_json(report, request, notes)))
    else:
        print_report(report, notes, Console())
    return 0


if __name__ == "__main__":
    sys.exit(main())
