"""The run report as one HTML file: matplotlib figures embedded as base64 PNG, no script,
no external file, so it can be mailed or attached to a ticket as it is."""

from __future__ import annotations

import base64
import html
import io
import time
from typing import TYPE_CHECKING, Any

from lmforge.report.record import RunRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MISSING = "matplotlib is not installed: pip install 'lmforge[report]'"


def _figure() -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError(MISSING) from None
    return Figure(figsize=(7, 3.2), dpi=100, layout="constrained")


def _png(figure: Figure) -> str:
    out = io.BytesIO()
    figure.savefig(out, format="png")
    data = base64.b64encode(out.getvalue()).decode()
    return f'<img alt="" src="data:image/png;base64,{data}">'


def _none(what: str) -> str:
    return f'<p class="none">{html.escape(what)}</p>'


def funnel(record: RunRecord) -> str:
    if not record.records_read:
        return _none("data-prep has not finished yet")
    reasons = sorted(record.dropped.items(), key=lambda kv: -kv[1])
    labels = ["read", *[f"- {r}" for r, _ in reasons], "kept"]
    values = [record.records_read, *[n for _, n in reasons], record.records_kept]
    fig = _figure()
    ax = fig.add_subplot()
    ax.barh(labels[::-1], values[::-1],
            color=["#2a7"] + ["#c54"] * len(reasons) + ["#48c"])
    ax.set_xlabel("documents")
    return _png(fig)


def loss_and_perplexity(record: RunRecord) -> str:
    if not record.progress:
        return _none("training has reported no step yet")
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([p["step"] for p in record.progress], [p["loss"] for p in record.progress],
            label="training loss", color="#48c")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if record.heldout:
        right = ax.twinx()
        right.plot([s for s, _ in record.heldout], [v for _, v in record.heldout], "o",
                   color="#c54", label="held-out perplexity")
        right.set_ylabel("held-out perplexity")
        right.legend(loc="upper center")
    ax.legend(loc="upper right")
    return _png(fig)


def throughput(record: RunRecord) -> str:
    if not record.progress:
        return _none("training has reported no step yet")
    fig = _figure()
    ax = fig.add_subplot()
    steps = [p["step"] for p in record.progress]
    ax.plot(steps, [p["tokens_per_second"] for p in record.progress], color="#2a7",
            label="tokens/s")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s")
    mfu = [p["mfu"] for p in record.progress]
    if any(mfu):
        right = ax.twinx()
        right.plot(steps, [m * 100 for m in mfu], color="#a5c", label="MFU %")
        right.set_ylabel("MFU %")
        right.legend(loc="upper center")
    else:
        ax.set_title("MFU not reported (LMFORGE_TRAINER_PEAK_TFLOPS unset)", fontsize=9)
    ax.legend(loc="upper right")
    return _png(fig)


def timeline(record: RunRecord) -> str:
    if not record.timeline and not record.progress:
        return _none("no checkpoint or preemption yet")
    start = record.started
    fig = _figure()
    ax = fig.add_subplot()
    if record.progress:
        ax.plot([p["time"] - start for p in record.progress],
                [p["step"] for p in record.progress], color="#999", label="step")
    for kind, color, marker in (("checkpoint", "#48c", "o"), ("preempted", "#c54", "X")):
        points = [t for t in record.timeline if t["kind"] == kind]
        if points:
            ax.scatter([t["time"] - start for t in points], [t["step"] for t in points],
                       color=color, marker=marker, label=kind, zorder=3)
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("step")
    ax.legend(loc="upper left")
    rows = "".join(
        f"<tr><td>{t['kind']}</td><td>{t['step']}</td><td>{t['time'] - start:.1f}</td>"
        f"<td>{t['seconds']:.2f}</td><td>{html.escape(t['reason'])}</td></tr>"
        for t in record.timeline)
    table = ("<table><tr><th>event</th><th>step</th><th>at s</th><th>checkpoint s</th>"
             f"<th>reason</th></tr>{rows}</table>") if rows else ""
    return _png(fig) + table


def quantization(record: RunRecord) -> str:
    q = record.quantization
    if not q:
        return _none("the model has not been quantized yet")
    rows = "".join(f"<tr><td>{name}</td><td>{value:.3f}</td></tr>" for name, value in (
        ("full precision", q["perplexity_fp"]), ("round-to-nearest int4", q["perplexity_rtn_int4"]),
        ("AWQ int4", q["perplexity_awq_int4"])) if value)
    gate = "passed" if q["passed_quality_gate"] else "FAILED"
    served = html.escape(q["served"] + (f" ({q['served_reason']})" if q["served_reason"] else ""))
    return (f"<table><tr><th>weights</th><th>held-out perplexity</th></tr>{rows}</table>"
            f"<p>method {html.escape(q['method'])}, {q['bits']} bits, group {q['group_size']}; "
            f"quality gate {gate}; served: {served}</p>")


def cost(record: RunRecord) -> str:
    entry = record.cost
    if not entry or not entry.get("charges"):
        return _none("no stage of this run has been priced yet")
    charges: list[dict[str, Any]] = list(entry["charges"].values())
    fig = _figure()
    ax = fig.add_subplot()
    by_stage: dict[str, float] = {}
    for c in charges:
        by_stage[c["stage"]] = by_stage.get(c["stage"], 0.0) + c["cost_usd"]
    ax.bar(list(by_stage), list(by_stage.values()), color="#48c")
    ax.set_ylabel("US$")
    rows = "".join(
        f"<tr><td>{html.escape(c['stage'])}</td><td>{c['count']}x {html.escape(c['hardware'])}"
        f"</td><td>{c['wall_seconds']:.1f}</td><td>{c['usd_per_hour']:.4f}</td>"
        f"<td>{c['cost_usd']:.6f}</td><td>{html.escape(c.get('note', ''))}</td></tr>"
        for c in charges)
    return (_png(fig) + "<table><tr><th>stage</th><th>hardware</th><th>wall s</th>"
            f"<th>$/h</th><th>$</th><th>note</th></tr>{rows}</table>"
            f"<p>total ${entry.get('total_usd', sum(by_stage.values())):.6f}</p>")


def latency(record: RunRecord) -> str:
    if not record.latency:
        return _none(record.latency_note or "no serving latency yet")
    fig = _figure()
    ax = fig.add_subplot()
    names = list(record.latency)
    ax.bar(names, [record.latency[n] * 1000 for n in names], color="#a5c")
    ax.set_ylabel("ms")
    return _png(fig) + f"<p>{html.escape(record.latency_note)}</p>"


SECTIONS = (
    ("Data-prep funnel by drop reason", funnel),
    ("Loss and held-out perplexity", loss_and_perplexity),
    ("Tokens/s and MFU", throughput),
    ("Checkpoints and preemptions", timeline),
    ("Quantization quality", quantization),
    ("Cost", cost),
    ("Serving latency percentiles", latency),
)

STYLE = """body{font:14px system-ui,sans-serif;max-width:60em;margin:2em auto;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:.2em .8em;border-bottom:1px solid #eee;
text-align:left}.none{color:#888;font-style:italic}img{max-width:100%}"""


def render(record: RunRecord) -> str:
    status = html.escape(record.status) + (
        f" — {html.escape(record.failure)}" if record.failure else "")
    body = "".join(f'<section><h2>{title}</h2>{draw(record)}</section>'
                   for title, draw in SECTIONS)
    made = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>lmforge run "
            f"{html.escape(record.run_id)}</title><style>{STYLE}</style></head><body>"
            f"<h1>Run {html.escape(record.run_id)} — model {html.escape(record.model_name)}</h1>"
            f"<p>status: <b>{status}</b>; report made {made}</p>{body}</body></html>")
