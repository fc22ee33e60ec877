"""lmforge: your own language model, from your own text to your own gRPC endpoint.

  lmforge up [-d]                       start NATS and the seven services
  lmforge plan DATA --model-size 1b --budget-hours 4   price the training on the catalog
  lmforge run DATA --model-name NAME    clean, train, quantize, export and serve DATA
  lmforge generate --model NAME "..."   stream a completion from the gateway
  lmforge report RUN [--out report.html]  one run as an HTML page with plots
  lmforge ui [--port 8765]              a status page in the browser, updated every second
  lmforge status | runs | scale | down
  lmforge cost [RUN]                    what each run and serving cost
  lmforge scaling replay TRACE.csv      replay a load trace through the scaling policies

Exit codes: 0 ok, 1 the operation failed (a run failed, nothing running),
2 bad usage or settings, 3 timed out.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lmforge.contracts.names import SERVICES, Bucket, ServiceName
from lmforge.presets import PRESETS
from lmforge.settings import PlatformSettings, load_settings

if TYPE_CHECKING:
    from lmforge.cli.runs import NatsUrl
    from lmforge.security.nats_connect import NatsAuth

EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 1, 2, 3
PUBLISH_TIMEOUT_S = 30.0
"""How long `run` waits for NATS to store its dataset.ready once connected."""
console = Console(stderr=True)


def _settings() -> PlatformSettings:
    return load_settings(PlatformSettings)


def _nats_url(settings: PlatformSettings) -> str:
    """The URL of the running `lmforge up` (its state file), else LMFORGE_NATS_URL."""
    from lmforge.cli.up import read_state

    state = read_state(settings.home)
    return state["nats_url"] if state else settings.nats_url


def _nats_auth(settings: PlatformSettings, role: str = "client") -> NatsAuth:
    """The CLI's NATS credential: LMFORGE_NATS_CREDS/_CA if set, else the `client` (or,
    for operator commands, `admin`) credential of the running `lmforge up`."""
    from lmforge.cli.up import home_nats_auth

    if settings.nats_creds or settings.nats_ca:
        return settings.nats_auth()
    return home_nats_auth(settings.home, role)


def _unreachable(exc: ConnectionError) -> int:
    """One line on stderr, exit 1: what could not be reached, and where to look."""
    console.print(f"[red]{exc}[/] (is lmforge up? `lmforge status` shows NATS)",
                  soft_wrap=True)
    return EXIT_FAILED


# -- up / down / status --------------------------------------------------------------

def cmd_up(args: argparse.Namespace) -> int:
    from lmforge.cli.up import run_foreground, start_detached

    settings = _settings()
    if args.nats_cluster and (args.nats_cluster < 3 or args.nats_cluster % 2 == 0):
        console.print(f"[red]--nats-cluster {args.nats_cluster}:[/] a JetStream cluster needs "
                      "an odd number of nodes, at least 3 (a majority must outlive a node)",
                      soft_wrap=True)
        return EXIT_USAGE
    if args.detach:
        argv = ["up", "--gateway-port", str(args.gateway_port)]
        if args.nats_url:
            argv += ["--nats-url", args.nats_url]
        if args.open_nats:
            argv.append("--open-nats")
        if args.insecure:
            argv.append("--insecure")
        if args.nats_cluster:
            argv += ["--nats-cluster", str(args.nats_cluster)]
        try:
            state = start_detached(settings.home, argv, timeout_s=args.timeout)
        except (RuntimeError, TimeoutError) as exc:
            console.print(f"[red]lmforge up failed:[/] {exc}")
            return EXIT_FAILED
        _print_status(state)
        return 0
    env = {"LMFORGE_GATEWAY_INSECURE": "1"} if args.insecure else {}
    return run_foreground(settings.home, nats_url=args.nats_url, gateway_port=args.gateway_port,
                          env=env, open_nats=args.open_nats, nats_cluster=args.nats_cluster)


def cmd_down(args: argparse.Namespace) -> int:
    from lmforge.cli.up import stop

    if stop(_settings().home):
        console.print("lmforge stopped")
        return 0
    console.print("lmforge is not running")
    return EXIT_FAILED


def _nats_line(state: dict[str, Any]) -> str:
    """`tls://127.0.0.1:4222 running (tls+credentials)`, with its restarts once it has any."""
    nats_state = state.get("nats") or {}
    line = f"{state['nats_url']} {nats_state.get('state', '')}".rstrip()
    if nats_state.get("security"):
        line += f" ({nats_state['security']})"
    if nats_state.get("restarts"):
        line += f" (restarted {nats_state['restarts']}x)"
    return line


def _print_status(state: dict[str, Any]) -> None:
    table = Table(title=f"lmforge — NATS {_nats_line(state)} — gateway {state['gateway']}")
    for column in ("service", "state", "replicas", "desired", "pinned", "restarts", "detail"):
        table.add_column(column)
    for name, s in state["services"].items():
        table.add_row(name, s["state"], str(s["replicas"]), str(s["desired"]),
                      "yes" if s["pinned"] else "", str(s["restarts"]),
                      "; ".join(filter(None, (_load_note(s), _models_note(s.get("models", []))))))
    security = state.get("security") or {}
    if security.get("open"):
        table.caption = "[bold yellow]OPEN:[/] " + "; ".join(security["open"])
    Console().print(table)


def _load_note(service: dict[str, Any]) -> str:
    """An unknown load first: the autoscaler is holding replicas it cannot judge, which
    otherwise looks like a healthy, steady service."""
    if not service.get("load_unknown"):
        return ""
    from rich.markup import escape

    return f"[yellow]load unknown[/]: {escape(service.get('scaling_reason') or 'held')}"


def _models_note(replicas: list[dict[str, Any]]) -> str:
    """What the gateway replicas say of their models: loading, failed loads, no answer."""
    notes = []
    for r in replicas:
        if "metrics" in r:
            notes.append(f"replica {r['replica']} metrics {r['metrics']}")
            continue
        if r["models_pending"]:
            notes.append(f"replica {r['replica']} loading {r['models_pending']} model(s)")
        for model, n in r["load_failures"].items():
            notes.append(f"replica {r['replica']}: {n} failed load(s) of {model}")
        for model, precision in r.get("precision", {}).items():
            notes.append(f"{model} at {precision}")
    return "; ".join(notes)


def cmd_status(args: argparse.Namespace) -> int:
    from lmforge.cli.status import read_status

    status = read_status(_settings().home)
    if status is None:
        if args.json:
            print(json.dumps({"running": False}))
        else:
            console.print("lmforge is not running (start it with `lmforge up -d`)")
        return EXIT_FAILED
    if args.json:
        print(json.dumps(status))
    else:
        _print_status(status)
    return 0


# -- run ------------------------------------------------------------------------------

def default_run_id(spec: str, model_name: str, tenant: str = "") -> str:
    """Same tenant, data and name -> same run id, so re-running unchanged data is a no-op (a
    single file: by its size and mtime; anything else: by the spec; the stage cache
    still reuses every stage whose inputs' bytes are unchanged). Two tenants training the
    same URL under the same model name get two run ids: a run id is the tenant's that
    used it first (`lmforge.run_owners`), so one would fail. No tenant: as before."""
    key = f"{spec}|{model_name}" + (f"|tenant={tenant}" if tenant else "")
    if "://" not in spec:
        # Local files: their sizes and mtimes, so a changed file (or a file added to a
        # directory) makes a new run instead of being taken for the same event again.
        path = Path(spec)
        files = [path] if path.is_file() else sorted(
            p for p in (path.rglob("*") if path.is_dir() else Path("/").glob(spec.lstrip("/")))
            if p.is_file())
        for file in files:
            stat = file.stat()
            key += f"|{file}|{stat.st_size}|{stat.st_mtime_ns}"
    return f"{model_name[:40]}-{hashlib.sha256(key.encode()).hexdigest()[:12]}".replace(".", "-")


def dataset_ready_msg_id(run_id: str, tenant: str) -> str:
    """The `Nats-Msg-Id` of a run's dataset.ready: the stream drops a repeat of the same
    tenant's (running the same command twice is a no-op), never another tenant's event
    under the same run id, which data-prep then refuses with the reason instead."""
    return f"{tenant}:{run_id}:dataset.ready" if tenant else f"{run_id}:dataset.ready"


def dataset_spec(data: str) -> str:
    """What the user named, as data-prep reads it: an s3:// URL as is; a file, directory
    or glob as an absolute path (data-prep checks it against LMFORGE_DATA_ROOTS)."""
    if "://" in data:
        return data
    return str(Path(data).expanduser().absolute())


def training_request(args: argparse.Namespace) -> Any:
    """The `run` flags that shape the plan, as dataset.ready's TrainingRequest."""
    from lmforge.contracts.v1 import events_pb2 as ev

    return ev.TrainingRequest(
        model_size=args.model_size or "", budget_usd=args.budget_usd or 0.0,
        instance_types=[t.strip() for t in (args.types or "").split(",") if t.strip()],
        family=args.family or "", precision=args.precision or "", compile=args.compile or "",
        micro_batch=args.micro_batch or 0, grad_accum=args.grad_accum or 0,
        global_batch=args.global_batch or 0, epochs=args.epochs or 0.0,
        market=args.market or "", **adaptation_request_fields(args))


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (0 would read as "unset")."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def quantization_request(args: argparse.Namespace) -> Any:
    """The `run` flags for the quantizer, as dataset.ready's QuantizationRequest."""
    from lmforge.contracts.v1 import events_pb2 as ev

    request = ev.QuantizationRequest(
        method=args.quantize or "", bits=args.quantize_bits or 0,
        group_size=args.quantize_group_size or 0,
        on_gate_failure=args.on_quality_gate_failure or "",
        calibration_samples=args.calibration_samples or 0)
    if args.max_ppl_increase is not None:
        request.max_ppl_increase = args.max_ppl_increase
    return request


def adaptation_request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The `run` flags for a base model and how it is adapted, as TrainingRequest fields.
    Paths are made absolute here: the services resolve them on their own machine."""
    fields: dict[str, Any] = {
        "base_model": str(Path(args.base_model).expanduser().absolute())
        if args.base_model else "",
        "adaptation": args.adaptation or "", "lora_rank": args.lora_rank or 0,
        "lora_alpha": args.lora_alpha or 0.0,
        "lora_targets": [t.strip() for t in (args.lora_targets or "").split(",") if t.strip()],
        "base_weights": args.base_weights or "",
        "gradient_checkpointing": args.gradient_checkpointing or "",
        "eval_set": str(Path(args.eval_set).expanduser().absolute()) if args.eval_set else "",
        "chat_template": read_chat_template(args.chat_template),
        "packing": args.packing or ""}
    if args.lora_dropout is not None:
        fields["lora_dropout"] = args.lora_dropout
    return fields


def read_chat_template(path: str | None) -> str:
    """The --chat-template file's text: the template travels in the event, so the services
    need no access to the user's file."""
    if not path:
        return ""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--chat-template {file}: cannot read it ({exc})") from None
    if not text.strip():
        raise ValueError(f"--chat-template {file}: the file is empty")
    return text


def cmd_plan(argv: list[str]) -> int:
    """The scheduler's planner over the catalog, run by its module (the CLI imports no
    service); every argument goes to it (`lmforge plan --help`)."""
    return subprocess.run([sys.executable, "-m", "services.scheduler.plan_command", *argv],
                          check=False).returncode


def cmd_run(args: argparse.Namespace) -> int:
    from lmforge.bus import EventBus
    from lmforge.cli.dataset_mounts import container_path
    from lmforge.contracts.v1 import events_pb2 as ev
    from lmforge.quantization_request import quantization_overrides
    from lmforge.run_ids import run_id_problem

    settings = _settings()
    spec = dataset_spec(args.data)
    if "://" not in spec and not any(c in spec for c in "*?[") and not Path(spec).exists():
        console.print(f"[red]dataset {spec} does not exist[/]")
        return EXIT_USAGE
    nats_url = _nats_url(settings)
    auth = _nats_auth(settings)
    run_id = args.run_id or default_run_id(spec, args.model_name, auth.tenant)
    problem = run_id_problem(run_id)
    if problem:
        console.print(f"[red]--run-id:[/] {problem}", soft_wrap=True)
        return EXIT_USAGE
    try:
        spec = container_path(spec, os.environ.get("LMFORGE_DATASET_MOUNTS", ""))
        training = training_request(args)  # reads --chat-template
        quantization = quantization_request(args)
        quantization_overrides(quantization)  # data-prep checks it too: fail here first
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        return EXIT_USAGE
    event = ev.DatasetReady(run_id=run_id, dataset_uri=spec, format=args.format,
                            text_field=args.text_field, model_name=args.model_name,
                            schema_version=1, time_budget_s=args.time_budget or 0.0,
                            training=training, quantization=quantization)
    event.tenant = auth.tenant  # the credential's tenant: its runs, models and costs

    async def publish() -> None:
        from lmforge.cli.runs import CONNECT_TIMEOUT_S, connect_nats

        # A bounded, quiet first contact: a dead URL is one line and exit 1.
        await (await connect_nats(nats_url, auth=auth)).close()
        bus = EventBus("cli")
        try:
            await asyncio.wait_for(bus.connect(nats_url, connect_timeout_s=CONNECT_TIMEOUT_S,
                                               auth=auth), CONNECT_TIMEOUT_S)
            msg_id = dataset_ready_msg_id(run_id, auth.tenant)
            await asyncio.wait_for(bus.publish(event, msg_id=msg_id), PUBLISH_TIMEOUT_S)
        except TimeoutError as exc:
            raise ConnectionError(f"NATS at {nats_url} did not store dataset.ready within "
                                  f"{PUBLISH_TIMEOUT_S:.0f}s; run the same command again "
                                  f"(it is idempotent)") from exc
        finally:
            await bus.close()

    try:
        asyncio.run(publish())
    except ConnectionError as exc:
        return _unreachable(exc)
    if args.json and not args.follow:
        print(json.dumps({"run_id": run_id}))
    else:
        console.print(f"run [bold]{run_id}[/]: dataset.ready published for {spec}")
    if not args.follow:
        return 0
    return asyncio.run(follow(lambda: _nats_url(settings), run_id, timeout_s=args.timeout,
                              as_json=args.json, auth=auth))


async def follow(nats_url: NatsUrl, run_id: str, *, timeout_s: float, as_json: bool,
                 auth: NatsAuth | None = None) -> int:
    """Show the run's progress until it is served or failed; across restarts of NATS,
    reading its URL again (`nats_url` as a callable) each time it comes back."""
    from lmforge.cli.runs import STAGES, RunView, event_json, stream_events

    view = RunView(run_id)
    started = time.monotonic()
    with Progress(TextColumn("{task.description:<18}"), BarColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                  console=console, disable=as_json) as progress:
        tasks = {stage: progress.add_task(stage, total=1, info="waiting", start=False)
                 for stage in STAGES}
        events = stream_events(nats_url, run_id=run_id, follow=True, auth=auth,
                               on_connection=lambda line: console.print(f"[yellow]{line}[/]"))
        try:
            while True:
                remaining = timeout_s - (time.monotonic() - started)
                if remaining <= 0:
                    console.print(f"[yellow]run {run_id} not finished after {timeout_s:.0f}s[/]")
                    return EXIT_TIMEOUT
                try:
                    subject, event, ts, cached_from = await asyncio.wait_for(anext(events),
                                                                             remaining)
                except TimeoutError:
                    continue
                if as_json:
                    print(json.dumps(event_json(subject, event, ts)), flush=True)
                view.fold(subject, event, ts, cached_from=cached_from)
                for stage in STAGES:
                    task = tasks[stage]
                    if stage in view.stage_done_at:
                        progress.start_task(task)
                        total = progress.tasks[task].total or 1
                        info = (f"done, perplexity {view.perplexity:.1f}"
                                if stage == ServiceName.TRAINER and view.perplexity else
                                f"done, {view.quantization}"
                                if stage == ServiceName.QUANTIZER and view.quantization
                                else "done")
                        if stage in view.reused_from:
                            info += f" (inputs unchanged: reused run {view.reused_from[stage]})"
                        progress.update(task, completed=total, info=info)
                    elif stage == view.stage and view.status != "failed":
                        progress.start_task(task)
                        if view.status == "queued":
                            progress.update(task, info="queued: waiting for a free trainer")
                        elif stage == ServiceName.TRAINER and view.total_steps:
                            progress.update(task, total=view.total_steps, completed=view.step,
                                            info=f"step {view.step}/{view.total_steps} "
                                                 f"loss {view.loss:.3f}")
                        else:
                            progress.update(task, info=view.status)
                if view.finished:
                    break
        finally:
            await events.aclose()
    if view.status == "failed":
        console.print(f"[red]run {run_id} failed[/] — {view.failure}")
        return EXIT_FAILED
    if view.reused_from:
        sources = sorted(set(view.reused_from.values()))
        console.print(f"{len(view.reused_from)} stage(s) reused the outputs of run "
                      f"{', '.join(sources)}: same data and settings "
                      f"({', '.join(view.reused_from)})")
    console.print(f"run [bold]{run_id}[/] served as model [bold]{view.model_name}[/] "
                  f"(held-out perplexity {view.perplexity:.1f})"
                  + (f" at {view.served}" if view.served else ""))
    return 0


def _reuse_note(reused_from: dict[str, str]) -> str:
    return f"reused run {', '.join(sorted(set(reused_from.values())))}" if reused_from else ""


def cmd_runs(args: argparse.Namespace) -> int:
    from lmforge.cli.cost import read_ledger
    from lmforge.cli.runs import collect_runs, run_json, task_eval_summary

    url = _nats_url(_settings())
    try:
        settings = _settings()
        auth = _nats_auth(settings)
        runs = asyncio.run(collect_runs(url, auth=auth))
        ledger, _serving = asyncio.run(read_ledger(url, auth=auth))
    except ConnectionError as exc:
        return _unreachable(exc)
    if args.json:
        print(json.dumps([run_json(r, ledger) for r in runs.values()]))
        return 0
    table = Table(title="runs")
    for column in ("run", "model", "stage", "status", "data kept", "steps", "perplexity",
                   "eval (* served)", "served", "cost", "detail"):
        table.add_column(column)
    for r in sorted(runs.values(), key=lambda r: r.started):
        cost = (ledger.get(r.run_id) or {}).get("total_usd")
        table.add_row(r.run_id, r.model_name, r.stage,
                      f"queued #{r.queue_position}" if r.queue_position else r.status,
                      r.data_kept,
                      f"{r.step}/{r.total_steps}" if r.total_steps else "",
                      f"{r.perplexity:.1f}" if r.perplexity else "",
                      task_eval_summary(r.task_eval), r.served[:100],
                      "" if cost is None else f"${cost:.4f}",
                      r.failure[:80] or _reuse_note(r.reused_from) or (
                          f"resumed {r.resumes}x, last at step {r.resumed_at_step}"
                          if r.resumes else ""))
    Console().print(table)
    return 0


# -- generate ---------------------------------------------------------------------------

def cmd_prep(args: argparse.Namespace) -> int:
    """The data-prep pipeline as a dry run: data-prep's own code, run by its module (the
    CLI imports no service), with the same LMFORGE_* settings."""
    command = [sys.executable, "-m", "services.data_prep.dry_run",
               *(dataset_spec(d) for d in args.data), "--out", str(args.out)]
    if args.json:
        command.append("--json")
    return subprocess.run(command, check=False).returncode


def cmd_search(args: argparse.Namespace) -> int:
    """The training passages nearest a query, from the semantic index of the dataset the
    model was last trained on (found in the run events; searched by data-prep's code)."""
    from lmforge.artifacts import ArtifactError
    from lmforge.cli.runs import model_dataset

    settings = _settings()
    try:
        digest = asyncio.run(model_dataset(_nats_url(settings), args.model,
                                           auth=_nats_auth(settings)))
    except ConnectionError as exc:
        return _unreachable(exc)
    if not digest:
        console.print(f"[red]no dataset was prepared for a model named {args.model!r}[/]")
        return EXIT_FAILED
    try:
        dataset = settings.artifact_store().get_dir(digest)
    except ArtifactError as exc:
        console.print(f"[red]the dataset of {args.model!r} cannot be read: {exc}[/]")
        return EXIT_FAILED
    command = [sys.executable, "-m", "services.data_prep.search",
               str(dataset / "semantic_index"), args.query, "-k", str(args.k)]
    if args.json:
        command.append("--json")
    return subprocess.run(command, check=False).returncode


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from lmforge.cli.up import read_state
    from lmforge.contracts.v1 import generate_pb2, generate_pb2_grpc

    settings = _settings()
    gateway = args.gateway
    if not gateway:
        state = read_state(settings.home)
        gateway = state["gateway"] if state else "127.0.0.1:50051"
    request = generate_pb2.GenerateRequest(
        model=args.model, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    with grpc.insecure_channel(gateway) as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        try:
            sys.stdout.write(args.prompt)
            for piece in stub.Generate(request, timeout=args.timeout):
                sys.stdout.write(piece.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
        except grpc.RpcError as exc:
            sys.stdout.write("\n")
            console.print(f"[red]{exc.code().name}[/]: {exc.details()}")
            return EXIT_FAILED
    return 0


# -- scale ------------------------------------------------------------------------------

def cmd_scale(args: argparse.Namespace) -> int:
    from lmforge.bus import ensure_kv

    pins: dict[ServiceName, int | None] = {}
    for item in args.assignments:
        name, sep, value = item.partition("=")
        if not sep or name not in SERVICES:
            console.print(f"[red]expected SERVICE=N or SERVICE=auto, SERVICE one of "
                          f"{', '.join(SERVICES)}; got {item!r}[/]")
            return EXIT_USAGE
        service = ServiceName(name)
        if value == "auto":
            pins[service] = None
        elif value.isdigit() and int(value) <= 64:
            pins[service] = int(value)
        else:
            console.print(f"[red]replicas {value!r} must be 0..64 or 'auto'[/]")
            return EXIT_USAGE

    async def write() -> None:
        from lmforge.cli.runs import connect_nats

        settings = _settings()
        nc = await connect_nats(_nats_url(settings), auth=_nats_auth(settings, "admin"))
        kv = await ensure_kv(nc.jetstream(), Bucket.SCALE_PINS,
                             replicas=settings.stream_replicas)
        for service, replicas in pins.items():
            if replicas is None:
                await kv.delete(service)
            else:
                await kv.put(service, str(replicas).encode())
        await nc.close()

    try:
        asyncio.run(write())
    except ConnectionError as exc:
        return _unreachable(exc)
    for service, replicas in pins.items():
        console.print(f"{service}: {'autoscaled' if replicas is None else f'pinned to {replicas}'}")
    return 0


# -- report -----------------------------------------------------------------------------

def cmd_report(args: argparse.Namespace) -> int:
    """One run as an HTML page with its plots embedded (or its record as JSON)."""
    from lmforge.cli.up import read_state
    from lmforge.report.collect import read_run_record

    settings = _settings()
    state = read_state(settings.home) or {}
    gateway = (state.get("services") or {}).get(ServiceName.INFERENCE_GATEWAY) or {}
    try:
        record = asyncio.run(read_run_record(_nats_url(settings), args.run,
                                             gateway_metrics_urls=gateway.get("metrics_urls",
                                                                              []),
                                             auth=_nats_auth(settings)))
    except ConnectionError as exc:
        return _unreachable(exc)
    if not record.started:
        console.print(f"[red]no events for run {args.run!r}[/] (`lmforge runs` lists the runs)")
        return EXIT_FAILED
    if args.json:
        print(json.dumps(record.as_json()))
        return 0
    from lmforge.report.html import render

    try:
        page = render(record)
    except RuntimeError as exc:  # matplotlib missing
        console.print(f"[red]{exc}[/]")
        return EXIT_FAILED
    args.out.write_text(page, encoding="utf-8")
    console.print(f"report of run {args.run} ({record.status}) written to {args.out}")
    return 0


# -- ui ---------------------------------------------------------------------------------

def cmd_ui(args: argparse.Namespace) -> int:
    """The status page (lmforge.ui.server), reading what `status`, `runs` and `cost` read,
    with the CLI's credential."""
    from lmforge.ui.feed import StatusFeed
    from lmforge.ui.server import is_loopback, serve

    if not is_loopback(args.host) and not args.insecure:
        console.print(f"[red]refusing to serve the status page on {args.host}:[/] it has no "
                      f"login; use a loopback address (default 127.0.0.1), or --insecure")
        return EXIT_USAGE
    settings = _settings()
    feed = StatusFeed(settings.home, nats_url=lambda: _nats_url(settings),
                      nats_auth=lambda: _nats_auth(settings))
    try:
        serve(feed, host=args.host, port=args.port,
              on_ready=lambda line: print(line, flush=True))
    except OSError as exc:  # the port is taken, or the address is not this machine's
        console.print(f"[red]cannot serve the status page on {args.host}:{args.port}:[/] "
                      f"{exc} (choose another with --port)")
        return EXIT_FAILED
    return 0


# -- cost and scaling --------------------------------------------------------------------

def cmd_cost(args: argparse.Namespace) -> int:
    """The cost ledger the autoscaler keeps: one run's charges, or every run's, and serving
    (replica-hours, $ per 1M tokens)."""
    from lmforge.cli.cost import read_ledger

    try:
        settings = _settings()
        auth = _nats_auth(settings)
        runs, serving = asyncio.run(read_ledger(_nats_url(settings), auth=auth))
    except ConnectionError as exc:
        return _unreachable(exc)
    if args.run and args.run not in runs:
        console.print(f"[red]no cost recorded for run {args.run!r}[/] (the autoscaler prices "
                      f"a run's stages as they finish; `lmforge runs` lists the runs)")
        return EXIT_FAILED
    chosen = {args.run: runs[args.run]} if args.run else runs
    if args.json:
        print(json.dumps({"runs": chosen, "serving": serving}))
        return 0
    out = Console()
    for run_id, entry in chosen.items():
        table = Table(title=f"run {run_id} ({entry.get('model_name', '')}): "
                      f"${entry['total_usd']:.4f}{_savings_note(entry)}")
        for column in ("stage", "attempt", "hardware", "market", "wall s", "$/h", "$", "note"):
            table.add_column(column)
        for charge in entry["charges"].values():
            table.add_row(charge["stage"], str(charge["attempt"]),
                          f"{charge['count']}x {charge['hardware']}", charge["market"],
                          f"{charge['wall_seconds']:.1f}", f"{charge['usd_per_hour']:.4f}",
                          f"{charge['cost_usd']:.4f}",
                          (f"reused from {charge['reused_from']}; " if charge["reused_from"]
                           else "") + charge["note"])
        out.print(table)
    if serving:
        per_million = serving.get("usd_per_million_tokens")
        out.print(f"serving: {serving['replica_hours']:.3f} replica-hours of "
                  f"{serving['hardware']} = ${serving['cost_usd']:.4f}; "
                  f"{serving['tokens']:.0f} tokens generated; "
                  + (f"${per_million:.4f} per 1M tokens" if per_million is not None
                     else "no tokens yet"))
        if serving.get("unknown_seconds"):
            out.print(f"  tokens unknown for {serving['unknown_seconds']:.0f}s "
                      f"(the gateway's /metrics did not answer)")
    elif not chosen:
        console.print("no costs recorded yet")
    return 0


def _savings_note(entry: dict[str, Any]) -> str:
    savings = entry.get("spot_savings_usd")
    if savings is None:
        return " (on-demand price of some hardware unknown: savings not claimed)"
    return f", saved ${savings:.4f} against on-demand" if savings else ""


def cmd_scaling_replay(args: argparse.Namespace) -> int:
    """The autoscaler's replay, run by its module (the CLI imports no service)."""
    command = [sys.executable, "-m", "services.cost_autoscaler.replay", str(args.trace),
               "--policies", args.policies, "--train-days", str(args.train_days)]
    for flag, value in (("--slo-p99-ms", args.slo_p99_ms),
                        ("--rps-per-replica", args.rps_per_replica),
                        ("--max-replicas", args.max_replicas)):
        if value is not None:
            command += [flag, str(value)]
    if args.json:
        command.append("--json")
    return subprocess.run(command, check=False).returncode


def cmd_keys(args: argparse.Namespace) -> int:
    from lmforge.cli.keys import run_keys

    settings = _settings()
    try:
        return run_keys(args, _nats_url(settings), _nats_auth(settings, "admin"))
    except ConnectionError as exc:
        return _unreachable(exc)


def cmd_tenants(args: argparse.Namespace) -> int:
    from lmforge.cli.tenants import run_tenants
    from lmforge.cli.up import read_state

    settings = _settings()
    return run_tenants(args, settings.home.resolve(), read_state(settings.home))


def cmd_secrets(args: argparse.Namespace) -> int:
    from lmforge.cli.secrets import run_secrets

    return run_secrets(args)


def cmd_nats_init(args: argparse.Namespace) -> int:
    from lmforge.cli.secrets import create_streams_and_buckets

    settings = _settings()
    try:
        made = asyncio.run(create_streams_and_buckets(
            _nats_url(settings), _nats_auth(settings, "admin"), settings.stream_replicas))
    except ConnectionError as exc:
        return _unreachable(exc)
    console.print(f"{len(made)} streams and buckets ready at {settings.stream_replicas} "
                  f"replica(s): {', '.join(made)}")
    return 0


# -- parser -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start NATS and the services (foreground, or -d)")
    up.add_argument("-d", "--detach", action="store_true", help="run in the background")
    up.add_argument("--nats-url", help="use this NATS instead of starting one")
    up.add_argument("--nats-cluster", type=int, default=0, metavar="N",
                    help="start N local nats-servers as one JetStream cluster (3: streams "
                         "and key-value buckets at 3 replicas, a node's loss rides out)")
    up.add_argument("--gateway-port", type=int, default=int(
        os.environ.get("LMFORGE_GATEWAY_PORT", "50051")), help="gRPC port (0 = any free)")
    up.add_argument("--timeout", type=float, default=180, help="seconds to wait with -d")
    up.add_argument("--open-nats", action="store_true",
                    help="start NATS without credentials or TLS (default: a credential per "
                    "service, TLS, generated under $LMFORGE_HOME/secrets)")
    up.add_argument("--insecure", action="store_true",
                    help="let the gateway serve a non-loopback address without TLS and API keys")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop what `lmforge up` started")
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="services, replicas and endpoints")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    run = sub.add_parser("run", help="start a pipeline run on a dataset")
    run.add_argument("data", help="a file, directory, glob or s3://bucket/prefix (inside "
                     "LMFORGE_DATA_ROOTS); .gz and .zst are read transparently")
    run.add_argument("--model-name", required=True, help="name to serve the model under")
    run.add_argument("--format", choices=("auto", "jsonl", "text", "csv", "tsv", "parquet"),
                     default="auto", help="auto: from each file's name")
    run.add_argument("--text-field", default="text",
                     help="JSONL field, CSV/TSV or Parquet column with the text")
    run.add_argument("--run-id", help="idempotency key (default: from the data and name)")
    run.add_argument("--time-budget", type=float, help="training seconds (default: scheduler's)")
    plan_flags = run.add_argument_group(
        "plan", "what the scheduler's planner must honour (default: its choice; "
        "`lmforge plan` shows the options); a type the scheduler's pool lacks fails the run")
    plan_flags.add_argument("--model-size", choices=sorted(PRESETS),
                            help="model preset (default: LMFORGE_SCHEDULER_PRESET)")
    plan_flags.add_argument("--budget-usd", type=float, help="dollar budget for training")
    plan_flags.add_argument("--types", help="comma-separated catalog instance types")
    plan_flags.add_argument("--family", choices=("llama", "qwen2"))
    plan_flags.add_argument("--precision", choices=("bf16", "fp16", "fp32"),
                            help="default: bf16 where the device has it, else fp16, else fp32")
    plan_flags.add_argument("--compile", choices=("on", "off"), help="torch.compile")
    plan_flags.add_argument("--micro-batch", type=int, help="sequences per device per pass")
    plan_flags.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    plan_flags.add_argument("--global-batch", type=int, help="sequences per optimizer step")
    plan_flags.add_argument("--epochs", type=float, help="passes over the data (default 4)")
    plan_flags.add_argument("--market", choices=("spot", "on-demand"))
    plan_flags.add_argument("--gradient-checkpointing", choices=("on", "off"),
                            help="recompute activations in backward (less memory)")
    base_flags = run.add_argument_group(
        "base model", "adapt a local Hugging Face model (Llama or Qwen2 layout, safetensors) "
        "instead of training from scratch; data-prep then tokenizes with its tokenizer")
    base_flags.add_argument("--base-model", metavar="DIR",
                            help="the model directory, inside LMFORGE_MODEL_ROOTS (default: "
                            "the data roots); never downloaded")
    base_flags.add_argument("--adaptation", choices=("full", "lora"),
                            help="full fine-tuning or LoRA adapters (default: full where it "
                            "fits, else LoRA)")
    base_flags.add_argument("--lora-rank", type=int, help="adapter rank (default 8)")
    base_flags.add_argument("--lora-alpha", type=float, help="adapter scale (default 2 x rank)")
    base_flags.add_argument("--lora-dropout", type=float,
                            help="adapter dropout (default 0: above 0 each adapter keeps a "
                            "copy of its input for backward)")
    base_flags.add_argument("--lora-targets", metavar="NAMES",
                            help="comma-separated modules (default: every attention and MLP "
                            "projection)")
    base_flags.add_argument("--eval-set", metavar="JSONL",
                            help="labelled examples (prompt + answer or label) scored after "
                            "training: exact match and macro-F1")
    base_flags.add_argument("--chat-template", metavar="FILE",
                            help="chat data (JSONL with messages, or prompt + response): the "
                            "Jinja template to render it with (default: the base tokenizer's)")
    base_flags.add_argument("--packing", choices=("packed", "unpacked"),
                            help="chat data: several conversations per sequence, each seeing "
                            "only itself (packed, default), or one per sequence")
    base_flags.add_argument("--base-weights", choices=("int8", "int4"),
                            help="LoRA: hold the base quantized (QLoRA; CUDA + bitsandbytes "
                            "only, refused elsewhere)")
    quant_flags = run.add_argument_group(
        "quantization", "how the trained model is quantized for serving (default: the "
        "quantizer's LMFORGE_QUANTIZER_* settings; data-prep checks these when the run starts)")
    quant_flags.add_argument("--quantize", choices=("awq", "rtn"),
                             help="AWQ int4 calibrated on the run's data, or round-to-nearest")
    quant_flags.add_argument("--quantize-bits", type=int, choices=(4, 8),
                             help="4 (packed AutoAWQ GEMM, served int4) or 8 (rtn only)")
    quant_flags.add_argument("--quantize-group-size", type=int, choices=(32, 64, 128, 256),
                             help="int4 input columns per scale (default 128; the int4 "
                             "kernels take 32, 64, 128 or 256)")
    quant_flags.add_argument("--on-quality-gate-failure", choices=("fail", "serve-fp"),
                             help="fail the run naming the figures, or serve fp32 and say so")
    quant_flags.add_argument("--max-ppl-increase", type=float, metavar="X",
                             help="the gate: largest relative held-out perplexity increase "
                             "(0.05 = 5%%)")
    quant_flags.add_argument("--calibration-samples", type=positive_int, metavar="N",
                             help="AWQ calibration windows from the training split")
    run.add_argument("--follow", action="store_true", help="show progress until served")
    run.add_argument("--timeout", type=float, default=3600, help="seconds to follow")
    run.add_argument("--json", action="store_true", help="JSON lines instead of bars")
    run.set_defaults(func=cmd_run)

    sub.add_parser("plan", help="rank the hardware and layouts for a run: hours, $, memory "
                   "headroom, checkpoint interval, and why the others were refused "
                   "(`lmforge plan --help`)")

    runs = sub.add_parser("runs", help="what every run is doing")
    runs.add_argument("--json", action="store_true")
    runs.set_defaults(func=cmd_runs)

    gen = sub.add_parser("generate", help="stream a completion")
    gen.add_argument("prompt")
    gen.add_argument("--model", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--gateway", help="host:port (default: the running gateway)")
    gen.add_argument("--timeout", type=float, default=60)
    gen.set_defaults(func=cmd_generate)

    prep = sub.add_parser("prep", help="data-prep as a dry run: what would be kept and why",
                          description="Runs data-prep's pipeline without the bus and writes "
                          "OUT/kept.jsonl (id, text, split, weight), OUT/report.json (counts "
                          "per stage and reason; every document's fate) and OUT/dataset/.")
    prep.add_argument("data", nargs="+", help="files, directories, globs or s3:// URLs")
    prep.add_argument("--out", type=Path, required=True, help="directory for the report")
    prep.add_argument("--json", action="store_true", help="the counts as JSON")
    prep.set_defaults(func=cmd_prep)

    search = sub.add_parser("search", help="training passages nearest a query",
                            description="Searches the semantic index of the dataset MODEL was "
                            "last prepared from (cosine similarity of MiniLM embeddings).")
    search.add_argument("model")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=5, help="passages to return")
    search.add_argument("--json", action="store_true")
    search.set_defaults(func=cmd_search)

    report = sub.add_parser("report", help="one run as a self-contained HTML page",
                            description="Writes one HTML file with the run's plots embedded: "
                            "the data-prep funnel, loss and held-out perplexity, tokens/s and "
                            "MFU, checkpoints and preemptions, quantization quality, cost and "
                            "serving latency. Works while the run is in progress.")
    report.add_argument("run", help="the run id")
    report.add_argument("--out", type=Path, default=Path("report.html"))
    report.add_argument("--json", action="store_true", help="the record as JSON instead")
    report.set_defaults(func=cmd_report)

    ui = sub.add_parser("ui", help="a status page in the browser",
                        description="Serves one page with the services and their replicas, "
                        "the runs and their progress, recent events and failures (stage.failed, "
                        "dead letters), the served models with their precision, and the cost so "
                        "far; it updates itself every second. /api/status has the same as JSON.")
    ui.add_argument("--port", type=int, default=int(os.environ.get("LMFORGE_UI_PORT", "8765")),
                    help="HTTP port (0 = any free one; default LMFORGE_UI_PORT or 8765)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ui.add_argument("--insecure", action="store_true",
                    help="serve a non-loopback address (the page has no login)")
    ui.set_defaults(func=cmd_ui)

    scale = sub.add_parser("scale", help="pin replicas: SERVICE=N, or SERVICE=auto to unpin")
    scale.add_argument("assignments", nargs="+")
    scale.set_defaults(func=cmd_scale)

    cost = sub.add_parser("cost", help="what each run cost, stage by stage, and serving",
                          description="Reads the autoscaler's cost ledger: every stage priced "
                          "as wall time x the hourly price of its hardware x the device count, "
                          "every attempt of a preempted run included, spot savings against "
                          "on-demand, and serving as gateway replica-hours and $ per 1M tokens.")
    cost.add_argument("run", nargs="?", help="one run id (default: every run)")
    cost.add_argument("--json", action="store_true")
    cost.set_defaults(func=cmd_cost)

    scaling = sub.add_parser("scaling", help="autoscaling tools")
    scaling_sub = scaling.add_subparsers(dest="scaling_command", required=True)
    replay = scaling_sub.add_parser(
        "replay", help="replay a request-rate trace through the scaling policies",
        description="Replays TRACE.csv (minute,requests_per_s; one row a minute) through the "
        "autoscaler's own policy code in simulated time and reports, per policy, "
        "replica-hours and dollars, SLO-violation minutes (demand above the capacity of the "
        "ready replicas) and scale events. Settings: LMFORGE_AUTOSCALER_*.")
    replay.add_argument("trace", type=Path)
    replay.add_argument("--slo-p99-ms", type=float,
                        help="p99 SLO (default LMFORGE_AUTOSCALER_SLO_P99_MS, 500)")
    replay.add_argument("--rps-per-replica", type=float,
                        help="replica capacity at that SLO (default "
                        "LMFORGE_AUTOSCALER_RPS_PER_REPLICA)")
    replay.add_argument("--policies", default="static,reactive,predictive")
    replay.add_argument("--train-days", type=float, default=0.0,
                        help="leading days that are history only (the forecast's), not scored")
    replay.add_argument("--max-replicas", type=int,
                        help="default LMFORGE_AUTOSCALER_MAX_REPLICAS")
    replay.add_argument("--json", action="store_true")
    replay.set_defaults(func=cmd_scaling_replay)

    from lmforge.cli.keys import add_keys_parser

    add_keys_parser(sub, cmd_keys)
    from lmforge.cli.tenants import add_tenants_parser

    add_tenants_parser(sub, cmd_tenants)
    from lmforge.cli.secrets import add_secrets_parser

    add_secrets_parser(sub, cmd_secrets)
    nats_init = sub.add_parser("nats-init", help="as admin, create every stream and bucket "
                               "(a secured NATS that `lmforge up` does not run: compose)")
    nats_init.set_defaults(func=cmd_nats_init)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:  # its own parser, in the scheduler's module
        return cmd_plan(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
