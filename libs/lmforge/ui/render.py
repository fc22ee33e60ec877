"""The status page's sections as HTML, from `StatusFeed.snapshot()`.

One renderer, on the server: the first page load gets the sections in the page
(it reads without JavaScript), and the page's script swaps in the same functions'
output from `/api/sections` once a second. Every value is escaped here; rows carry
data-* attributes with the raw values, for scripts and for the browser test.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from html import escape
from importlib.resources import files
from string import Template
from typing import Any

from lmforge.cli.runs import STAGES

Snapshot = dict[str, Any]


def _cell(value: object) -> str:
    return f"<td>{escape(str(value))}</td>"


def clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else ""


def _table(columns: Iterable[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _attrs(**values: object) -> str:
    return " ".join(f'data-{name.replace("_", "-")}="{escape(str(value))}"'
                    for name, value in values.items())


def render_summary(snapshot: Snapshot) -> str:
    lmforge = snapshot["lmforge"]
    if not lmforge["running"]:
        return ('<p class="bad">lmforge is not running (start it with '
                "<code>lmforge up -d</code>)</p>")
    nats = lmforge.get("nats") or {}
    nats_line = f"{lmforge.get('nats_url', '')} {nats.get('state', '')}"
    if nats.get("security"):
        nats_line += f" ({nats['security']})"
    if nats.get("restarts"):
        nats_line += f", restarted {nats['restarts']}x"
    return ("<dl>"
            f"<dt>NATS</dt><dd>{escape(nats_line)}</dd>"
            f"<dt>gateway (gRPC)</dt><dd>{escape(str(lmforge.get('gateway', '')))}</dd>"
            f"<dt>OpenAI API</dt><dd>{escape(str(lmforge.get('openai_base_url', '')))}</dd>"
            f"<dt>home</dt><dd>{escape(str(lmforge.get('home', '')))}</dd>"
            "</dl>")


def render_services(snapshot: Snapshot) -> str:
    rows = []
    for s in snapshot["services"]:
        state_class = "ok" if s["state"] == "running" else "bad"
        links = " ".join(f'<a href="{escape(url)}">{escape(url.split("//", 1)[-1])}</a>'
                         for url in s.get("metrics_urls", []))
        ready = f"{s['replicas']}/{s['desired']}"
        pids = " ".join(str(p) for p in s.get("pids", []))
        row_attrs = _attrs(service=s["name"], state=s["state"], replicas=s["replicas"])
        rows.append(
            f"<tr {row_attrs}>{_cell(s['name'])}"
            f'<td class="{state_class}">{escape(s["state"])}</td>'
            f"{_cell(ready)}{_cell('yes' if s['pinned'] else '')}"
            f"{_cell(s['restarts'])}{_cell(pids)}<td>{links}</td></tr>")
    return _table(("service", "state", "ready/desired", "pinned", "restarts", "pids",
                   "metrics"), rows, "no services: lmforge is not running")


def _progress(run: dict[str, Any]) -> str:
    """A bar for the training steps once a plan has them, and where the run is."""
    stage_number = STAGES.index(run["stage"]) + 1 if run["stage"] in STAGES else 0
    where = f"stage {stage_number}/{len(STAGES)} {run['stage']}"
    if run["total_steps"]:
        step, total = run["step"], run["total_steps"]
        steps = f'<progress value="{step}" max="{total}"></progress> step {step}/{total}' 
        if run["loss"]:
            steps += f" loss {run['loss']:.3f}"
        return f"{escape(where)}<br>{steps}"
    return escape(where)


def render_runs(snapshot: Snapshot) -> str:
    rows = []
    for run in snapshot["runs"]:
        status = (f"queued #{run['queue_position']}" if run["queue_position"]
                  else run["status"])
        detail = run["failure"] or (
            f"reused run {', '.join(sorted(set(run['reused_from'].values())))}"
            if run["reused_from"] else "") or (
            f"resumed {run['resumes']}x, last at step {run['resumed_at_step']}"
            if run["resumes"] else "") or run["quantization"]
        status_class = {"failed": "bad", "served": "ok"}.get(run["status"], "")
        cost = "" if run["cost_usd"] is None else f"${run['cost_usd']:.4f}"
        perplexity = f"{run['perplexity']:.2f}" if run["perplexity"] else ""
        row_attrs = _attrs(run_id=run["run_id"], stage=run["stage"], status=run["status"],
                           step=run["step"], total_steps=run["total_steps"],
                           cost_usd="" if run["cost_usd"] is None else run["cost_usd"])
        rows.append(
            f"<tr {row_attrs}>{_cell(run['run_id'])}{_cell(run['model_name'])}"
            f'<td class="{status_class}">{escape(status)}</td>'
            f'<td class="progress">{_progress(run)}</td>'
            f"{_cell(run['data_kept'])}{_cell(perplexity)}{_cell(run['served'])}"
            f"{_cell(cost)}{_cell(detail)}{_cell(clock(run['started']))}</tr>")
    return _table(("run", "model", "status", "progress", "data kept", "perplexity", "served",
                   "cost", "detail", "started"), rows, "no runs yet (`lmforge run DATA "
                   "--model-name NAME` starts one)")


def render_models(snapshot: Snapshot) -> str:
    rows = [f"<tr {_attrs(model=m['model'], precision=m['precision'])}>"
            f"{_cell(m['model'])}{_cell(m['precision'])}"
            f"{_cell(', '.join(str(r) for r in m['replicas']))}</tr>"
            for m in snapshot["models"]]
    return _table(("model version", "precision", "gateway replicas"), rows,
                  "no model is served yet")


def render_cost(snapshot: Snapshot) -> str:
    cost = snapshot["cost"]
    serving = cost["serving"]
    line = (f"<p><strong>${cost['total_usd']:.4f}</strong> so far: "
            f"runs ${cost['runs_usd']:.4f}, serving ${cost['serving_usd']:.4f}")
    if serving:
        per_million = serving.get("usd_per_million_tokens")
        line += escape(f" ({serving.get('replica_hours', 0.0):.3f} replica-hours of "
                       f"{serving.get('hardware', '')}, {serving.get('tokens', 0):.0f} tokens"
                       + (f", ${per_million:.4f} per 1M tokens" if per_million is not None
                          else "") + ")")
    return line + "</p>"


def render_events(snapshot: Snapshot) -> str:
    rows = []
    for e in snapshot["events"]:
        summary = e["summary"] + (f" (reused from {e['reused_from']})" if e["reused_from"]
                                  else "")
        rows.append(f"<tr {_attrs(subject=e['subject'], run_id=e['run_id'])}>"
                    f"{_cell(clock(e['time']))}{_cell(e['subject'])}{_cell(e['run_id'])}"
                    f"{_cell(summary)}</tr>")
    return _table(("time", "event", "run", "what it says"), rows, "no events yet")


def render_failures(snapshot: Snapshot) -> str:
    dead = snapshot["dead_letters"]
    dead_line = ("<p>dead letters: " + escape(", ".join(f"{stage} {count}" for stage, count
                                                         in dead.items())) + "</p>"
                 if dead else "<p>no dead letters</p>")
    rows = [f"<tr {_attrs(stage=f['stage'], run_id=f['run_id'])}>"
            f"{_cell(clock(f['time']))}{_cell(f['stage'])}{_cell(f['run_id'])}"
            f"{_cell(f['reason'])}{_cell(f['deliveries'])}"
            f"{_cell('yes' if f['dead_lettered'] else '')}</tr>"
            for f in snapshot["failures"]]
    notes = "".join(f'<p class="bad">{escape(n)}</p>' for n in snapshot["notes"])
    return dead_line + _table(("time", "stage", "run", "reason", "deliveries",
                               "dead-lettered"), rows, "no stage has failed") + notes


SECTIONS: dict[str, Callable[[Snapshot], str]] = {
    "summary": render_summary, "services": render_services, "runs": render_runs,
    "models": render_models, "cost": render_cost, "failures": render_failures,
    "events": render_events,
}
"""Element id on the page -> its renderer (the page has one element per id)."""


def render_sections(snapshot: Snapshot) -> dict[str, str]:
    return {section: render(snapshot) for section, render in SECTIONS.items()}


def render_page(snapshot: Snapshot, *, poll_ms: int) -> str:
    """The whole page: page.html (a package resource) with every section filled in."""
    template = Template(files("lmforge.ui").joinpath("page.html").read_text(encoding="utf-8"))
    return template.substitute(render_sections(snapshot), poll_ms=poll_ms,
                               generated=escape(clock(snapshot["generated"])))
