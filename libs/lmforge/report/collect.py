"""Gathering a run's record from a running lmforge: the stream, the cost ledger, the gateway."""

from __future__ import annotations

from lmforge.cli.runs import NatsUrl, stream_events
from lmforge.report.record import RunRecord, fold_events, histogram_percentiles
from lmforge.security.nats_connect import NatsAuth

LATENCY_BUCKETS = "lmforge_gateway_request_seconds_bucket"


async def read_run_record(nats_url: NatsUrl, run_id: str, *,
                          gateway_metrics_urls: list[str],
                          auth: NatsAuth | None = None) -> RunRecord:
    """Raises ConnectionError when NATS cannot be reached (or refuses `auth`, the CLI's
    credential); a gateway that does not answer is written into the record's latency
    note, not hidden."""
    from lmforge.cli.cost import read_ledger

    events = [(subject, event, ts) async for subject, event, ts, _cached
              in stream_events(nats_url, run_id=run_id, auth=auth)]
    record = fold_events(run_id, events)
    if not events:
        return record
    runs, _serving = await read_ledger(nats_url, auth=auth)
    record.cost = runs.get(run_id, {})
    record.latency, record.latency_note = gateway_latency(gateway_metrics_urls)
    return record


def gateway_latency(urls: list[str]) -> tuple[dict[str, float], str]:
    """Percentiles of every request the gateway replicas answered since they started."""
    from lmforge.cli.metrics import read_samples

    if not urls:
        return {}, "no gateway is running: no latency to show"
    totals: dict[float, float] = {}
    unreachable = []
    for url in urls:
        try:
            samples = read_samples(url, [LATENCY_BUCKETS], timeout_s=2.0)[LATENCY_BUCKETS]
        except OSError as exc:
            unreachable.append(f"{url}: {exc}")
            continue
        for labels, value in samples:
            le = float(labels["le"])
            totals[le] = totals.get(le, 0.0) + value
    percentiles = histogram_percentiles(sorted(totals.items()))
    note = "every request the gateway answered since it started (all models)"
    if unreachable:
        note += "; not answering: " + "; ".join(unreachable)
    if not percentiles:
        note = "the gateway has answered no request yet" + (
            "; not answering: " + "; ".join(unreachable) if unreachable else "")
    return percentiles, note
