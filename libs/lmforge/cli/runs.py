"""Reading runs back from the event stream: for `lmforge run --follow` and `lmforge runs`.

The stream is the record: a run's state is folded from its events, so the
CLI needs no database and shows exactly what the services said.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import nats.js.errors
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy

from lmforge.contracts import subjects
from lmforge.contracts.names import Header, ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.security.nats_connect import NatsAuth, refused_credentials
from lmforge.task_eval import FP, quantized_run_figures, served_figures

STAGES: tuple[ServiceName, ...] = (
    ServiceName.DATA_PREP, ServiceName.SCHEDULER, ServiceName.TRAINER, ServiceName.QUANTIZER,
    ServiceName.EXPORTER, ServiceName.INFERENCE_GATEWAY,
)
"""The services a run passes through, in order (the autoscaler watches, it is no stage)."""

STAGE_OF: dict[str, tuple[ServiceName, str]] = {
    subjects.DATASET_READY.name: (ServiceName.DATA_PREP, "queued"),
    subjects.DATASET_PREPARED.name: (ServiceName.DATA_PREP, "done"),
    subjects.TRAINING_SCHEDULED.name: (ServiceName.SCHEDULER, "done"),
    subjects.TRAINING_PROGRESS.name: (ServiceName.TRAINER, "running"),
    subjects.TRAINING_CHECKPOINTED.name: (ServiceName.TRAINER, "running"),
    subjects.TRAINING_PREEMPTED.name: (ServiceName.TRAINER, "preempted"),
    subjects.MODEL_TRAINED.name: (ServiceName.TRAINER, "done"),
    subjects.MODEL_QUANTIZED.name: (ServiceName.QUANTIZER, "done"),
    subjects.MODEL_EXPORTED.name: (ServiceName.EXPORTER, "done"),
    subjects.MODEL_DEPLOYED.name: (ServiceName.INFERENCE_GATEWAY, "done"),
}
"""Which stage an event speaks for, and what it says of it."""

log = logging.getLogger("lmforge.cli")


@dataclass
class RunView:
    run_id: str
    model_name: str = ""
    stage: str = ServiceName.DATA_PREP
    status: str = "queued"
    started: float = 0.0
    updated: float = 0.0
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    perplexity: float = 0.0
    failure: str = ""
    stage_done_at: dict[str, float] = field(default_factory=dict)
    reused_from: dict[str, str] = field(default_factory=dict)
    """Stages whose outputs the stage cache replayed, and the run that computed them."""
    attempt: tuple[int, int] = (0, 0)
    """(scheduling attempt, delivery) of the training progress shown: a resume raises it."""
    resumes: int = 0
    """How often training resumed from a checkpoint (a preemption or a crashed trainer)."""
    resumed_at_step: int = 0
    data_kept: str = ""
    """"kept/read" documents, from dataset.prepared."""
    data_dropped: dict[str, int] = field(default_factory=dict)
    """Documents data-prep dropped per reason code."""
    queued_at: float = 0.0
    """When the run's training job was scheduled (it waits for a free trainer)."""
    queue_position: int = 0
    """1 = next to train, while `status` is "queued" at the trainer (set by collect_runs)."""
    quantization: str = ""
    """The quantizer's comparison: "awq-int4 ppl 12.61 (fp 12.40, RTN int4 12.95)"."""
    served: str = ""
    """The served precision and, when it is not what was asked, why (model.quantized,
    then model.deployed)."""
    task_eval: dict[str, Any] = field(default_factory=dict)
    """The eval set's figures per set of weights scored and which of them is served
    (task_eval.served_figures): the fp model from model.trained, then the fp and the
    quantized weights from model.quantized. {} for a run without an eval set."""

    def fold(self, subject: str, event: Message, timestamp: float, *,
             cached_from: str = "") -> None:
        """Take in one event of this run (`cached_from`: its Lmforge-Cached-From header)."""
        self.started = self.started or timestamp
        self.updated = timestamp
        self.model_name = getattr(event, "model_name", "") or self.model_name
        if isinstance(event, ev.StageFailed):
            self.status, self.failure = "failed", f"{event.stage}: {event.reason}"
            self.stage = event.stage
            return
        stage, status = STAGE_OF.get(subject, (self.stage, self.status))
        if status == "done":
            self.stage_done_at[stage] = timestamp
            if cached_from:
                self.reused_from[stage] = cached_from
        if isinstance(event, ev.TrainingProgress):
            attempt = (event.attempt, max(1, event.delivery))
            if attempt < self.attempt:
                return  # a late event of an attempt that has been resumed since
            if attempt > self.attempt and self.attempt != (0, 0):
                self.resumes += 1
                self.resumed_at_step = event.step
            self.attempt = attempt
            self.step, self.total_steps, self.loss = event.step, event.total_steps, event.loss
        if isinstance(event, ev.TrainingScheduled):
            self.total_steps = event.plan.max_steps
        if isinstance(event, ev.DatasetPrepared):
            self.data_kept = f"{event.stats.records_kept}/{event.stats.records_read}"
            self.data_dropped = dict(event.stats.dropped)
        if isinstance(event, ev.ModelTrained):
            self.perplexity = event.heldout_perplexity
            self.step = event.steps
            if event.HasField("task_eval"):
                self.task_eval = served_figures({FP: event.task_eval}, "")
        if isinstance(event, ev.ModelQuantized):
            self.quantization = quantization_summary(event)
            if event.served_reason:
                self.served = f"{event.served}: {event.served_reason}"
            if figures := quantized_run_figures(event):
                # The quantizer scores the fp model again, on the same set: its figures
                # replace the trainer's; a measurement it did not make keeps the earlier.
                self.task_eval = {**self.task_eval, **figures}
        if isinstance(event, ev.ModelDeployed) and event.precision:
            self.served = event.precision + (f": {event.precision_reason}"
                                             if event.precision_reason else "")
        if status == "done" and stage != ServiceName.INFERENCE_GATEWAY:
            nxt = STAGES[STAGES.index(stage) + 1]
            # A scheduled job waits for a trainer until its first progress event.
            self.stage, self.status = nxt, ("queued" if nxt == ServiceName.TRAINER
                                            else "running")
            if nxt == ServiceName.TRAINER:
                self.queued_at = timestamp
        else:
            self.stage, self.status = stage, ("served" if stage == ServiceName.INFERENCE_GATEWAY
                                              else status)

    @property
    def finished(self) -> bool:
        return self.status in ("served", "failed")


def task_eval_summary(task_eval: dict[str, Any]) -> str:
    """ "fp EM 0.64 F1 0.60, awq-int4* EM 0.62 F1 0.58": exact match and macro-F1 per
    set of weights, the served one starred ('' without an eval set)."""
    return ", ".join(
        f"{name}{'*' if name == task_eval.get('served') else ''} "
        f"EM {figures['exact_match']:.2f} F1 {figures['macro_f1']:.2f}"
        for name, figures in task_eval.items() if name != "served")


def quantization_summary(event: ev.ModelQuantized) -> str:
    """`method` ppl X (fp Y, RTN int4 Z, AWQ int4 W), the figures that were measured."""
    figures = [f"{label} {value:.2f}" for label, value in (
        ("fp", event.perplexity_fp or event.perplexity_before),
        ("RTN int4", event.perplexity_rtn_int4), ("AWQ int4", event.perplexity_awq_int4))
        if value]
    gate = "" if event.passed_quality_gate else ", gate failed"
    return f"{event.method} ppl {event.perplexity_after:.2f} ({', '.join(figures)}{gate})"


CONNECT_TIMEOUT_S = 3.0
"""How long a command tries to reach NATS before it says so and exits 1: long enough for
the supervisor to bring back a crashed server (about a second), short for a dead URL."""


async def connect_nats(nats_url: str, *, timeout_s: float = CONNECT_TIMEOUT_S,
                       reconnect: bool = True, auth: NatsAuth | None = None) -> Client:
    """A connection, or ConnectionError after `timeout_s` (nats-py's first attempt
    retries forever once reconnects are unlimited). Once made, it reconnects by
    itself unless `reconnect` is False: then it closes when the server goes away,
    for a caller that finds the server again on its own. `auth`: the CLI's
    credential (the `client` role of `lmforge up`); a refused one is said so."""
    last_error = ""

    async def on_error(exc: Exception) -> None:
        nonlocal last_error
        last_error = f"{type(exc).__name__}: {exc}"
        log.debug("NATS at %s: %s", nats_url, exc)

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await asyncio.wait_for(
                nats.connect(nats_url.split(","), connect_timeout=2, allow_reconnect=reconnect,
                             max_reconnect_attempts=-1, reconnect_time_wait=0.25,
                             error_cb=on_error, **(auth or NatsAuth()).connect_options()),
                max(0.1, deadline - time.monotonic()))
        except nats.errors.Error as exc:
            if not refused_credentials(exc):
                raise
            raise ConnectionError(f"NATS at {nats_url} refused the credential "
                                  f"({(auth or NatsAuth()).credential!r})") from exc
        except (nats.errors.NoServersError, OSError) as exc:
            # Refused at once (only without reconnects): try again until the deadline.
            if time.monotonic() + 0.25 >= deadline:
                raise ConnectionError(f"cannot reach NATS at {nats_url} within "
                                      f"{timeout_s:.0f}s") from exc
            await asyncio.sleep(0.25)
        except TimeoutError as exc:
            raise ConnectionError(f"cannot reach NATS at {nats_url} within "
                                  f"{timeout_s:.0f}s" + (f": {last_error}" if last_error
                                                         else "")) from exc


NatsUrl = str | Callable[[], str]
"""A NATS URL, or where to read the current one (the state file of `lmforge up`)."""


RawEvent = tuple[str, bytes, float, dict[str, str]]
"""(subject as delivered, data, time, headers) of one message of the stream."""


async def stream_events(nats_url: NatsUrl, *, run_id: str | None = None, follow: bool = False,
                        idle_timeout_s: float = 1.0,
                        on_connection: Callable[[str], None] | None = None,
                        auth: NatsAuth | None = None,
                        ) -> AsyncGenerator[tuple[str, Message, float, str], None]:
    """Every event in the stream (optionally one run's), oldest first, as (subject,
    event, time, the run it was reused from or '').

    A tenant's client credential (`auth.reads_by_query`) gets its tenant's events only,
    asked of cost-autoscaler (`tenant_reads`): the server lets it read nothing else. The
    admin credential, or none (an open server), reads the stream itself: every run.

    Without `follow`, an unreachable server is a ConnectionError. With `follow`,
    keep waiting for new events; when the server goes away, read the URL again
    (it may have moved), reconnect once it answers and go on after the last event
    seen, so nothing is shown twice or skipped. `on_connection` hears of each
    loss and return of the server, once each.
    """
    current_url = nats_url if callable(nats_url) else (lambda: nats_url)
    position = [1]  # the next stream sequence to read, kept across reconnects
    lost_at = ""
    while True:
        url = current_url()
        try:
            nc = await connect_nats(url, reconnect=False, auth=auth)
        except ConnectionError:
            if not follow:
                raise
            if not lost_at and on_connection:
                on_connection(f"NATS at {url} is not answering; waiting for it")
            lost_at = lost_at or url
            await asyncio.sleep(1.0)
            continue
        if lost_at and on_connection:
            on_connection(f"following again on NATS at {url}")
        lost_at = ""
        try:
            if auth is not None and auth.reads_by_query:
                raw = _queried_events(nc, auth.tenant, position, run_id=run_id or "",
                                      follow=follow, idle_timeout_s=idle_timeout_s,
                                      on_connection=on_connection)
            else:
                raw = _stream_messages(nc, position, run_id=run_id or "", follow=follow,
                                       idle_timeout_s=idle_timeout_s)
            async for delivered, data, ts, headers in raw:
                try:
                    subject = subjects.by_name(delivered)
                    event = subject.decode(data)
                except (KeyError, DecodeError):
                    continue
                # the catalog name: a tenant-scoped subject arrives with its tenant token
                yield subject.name, event, ts, headers.get(Header.CACHED_FROM, "")
            if not nc.is_connected:  # not the end of the stream: the server went away
                raise nats.errors.ConnectionClosedError
            return
        except (nats.errors.ConnectionClosedError, nats.errors.TimeoutError,
                nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError) as exc:
            # Gone, or back but JetStream still recovering its store.
            if not follow:
                raise ConnectionError(f"lost NATS at {url}: {type(exc).__name__}") from exc
        finally:
            with contextlib.suppress(Exception):
                await nc.close()
        if on_connection:
            on_connection(f"lost NATS at {url}; waiting for it")
        lost_at = url
        await asyncio.sleep(0.5)


async def _stream_messages(nc: Client, position: list[int], *, run_id: str, follow: bool,
                           idle_timeout_s: float) -> AsyncGenerator[RawEvent, None]:
    """The stream itself from `position[0]` on (every tenant's runs): until it is idle for
    `idle_timeout_s`, or, following, until the connection is lost."""
    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                            opt_start_seq=position[0])
    sub = await nc.jetstream().subscribe("lmforge.>", ordered_consumer=True,
                                         stream=subjects.STREAM, config=config)
    while True:
        try:
            msg = await sub.next_msg(timeout=idle_timeout_s)
        except nats.errors.ConnectionClosedError:
            return
        except nats.errors.TimeoutError:
            if not nc.is_connected or not follow:
                return
            continue
        position[0] = msg.metadata.sequence.stream + 1
        headers = msg.headers or {}
        if run_id and headers.get(Header.RUN_ID) != run_id:
            continue
        ts = msg.metadata.timestamp.timestamp() if msg.metadata.timestamp else 0.0
        yield msg.subject, msg.data, ts, headers


async def _queried_events(nc: Client, tenant: str, position: list[int], *, run_id: str,
                          follow: bool, idle_timeout_s: float,
                          on_connection: Callable[[str], None] | None
                          ) -> AsyncGenerator[RawEvent, None]:
    """`tenant`'s events from `position[0]` on, page by page; following, asking again
    every `idle_timeout_s` once the pages reach the end of the stream. Without
    cost-autoscaler, a QueryUnanswered (a ConnectionError), or, following, a wait for
    it, said once. An event too large for one answer comes without its data: a
    warning says so and the events after it follow."""
    from lmforge.cli.tenant_reads import QueryUnanswered, events_page

    waiting = False
    while nc.is_connected:
        try:
            page = await events_page(nc, tenant, from_seq=position[0], run_id=run_id)
        except QueryUnanswered as exc:
            if not follow or not nc.is_connected:
                raise
            if not waiting and on_connection:
                on_connection(f"{exc}; waiting for an answer")
            waiting = True
            await asyncio.sleep(1.0)
            continue
        if waiting and on_connection:
            on_connection("cost-autoscaler answers again")
        waiting = False
        for queried in page.events:
            if queried.omitted_bytes:
                log.warning("event %d (%s) is %d bytes, more than one answer of "
                            "cost-autoscaler holds: not shown", queried.seq, queried.subject,
                            queried.omitted_bytes)
                continue
            yield (queried.subject, queried.data, queried.time,
                   {Header.CACHED_FROM: queried.cached_from} if queried.cached_from else {})
        position[0] = page.next_seq
        if page.end:
            if not follow:
                return
            await asyncio.sleep(idle_timeout_s)


async def collect_runs(nats_url: NatsUrl, *, auth: NatsAuth | None = None
                       ) -> dict[str, RunView]:
    """The runs in the stream: a tenant's credential, only that tenant's."""
    runs: dict[str, RunView] = {}
    async for subject, event, ts, cached_from in stream_events(nats_url, idle_timeout_s=0.5,
                                                               auth=auth):
        run_id = getattr(event, "run_id", "")
        if not run_id or subject == subjects.SCALING_DECIDED.name:
            continue
        runs.setdefault(run_id, RunView(run_id)).fold(subject, event, ts,
                                                      cached_from=cached_from)
    number_queue(runs.values())
    return runs


def number_queue(runs: Iterable[RunView]) -> None:
    """Give the runs waiting for a trainer their place in line, oldest first, and every
    other run none (a view folded on, as the status page's, leaves the queue)."""
    runs = list(runs)
    for run in runs:
        run.queue_position = 0
    waiting = sorted((r for r in runs if r.stage == ServiceName.TRAINER and r.status == "queued"),
                     key=lambda r: r.queued_at)
    for position, run in enumerate(waiting, start=1):
        run.queue_position = position


def run_json(run: RunView, ledger: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One run as `lmforge runs --json` prints it, its cost from the ledger (None until
    the autoscaler has priced a stage of it)."""
    return {"run_id": run.run_id, "model_name": run.model_name, "stage": run.stage,
            "status": run.status, "step": run.step, "total_steps": run.total_steps,
            "loss": run.loss, "perplexity": run.perplexity, "failure": run.failure,
            "started": run.started, "updated": run.updated,
            "stage_done_at": run.stage_done_at, "reused_from": run.reused_from,
            "resumes": run.resumes, "resumed_at_step": run.resumed_at_step,
            "queue_position": run.queue_position, "data_kept": run.data_kept,
            "data_dropped": run.data_dropped, "quantization": run.quantization,
            "served": run.served, "task_eval": run.task_eval or None,
            "cost_usd": (ledger.get(run.run_id) or {}).get("total_usd")}


def event_json(subject: str, event: Message, ts: float) -> dict[str, Any]:
    return {"subject": subject, "time": ts,
            "event": MessageToDict(event, preserving_proto_field_name=True)}


async def model_dataset(nats_url: NatsUrl, model_name: str, *,
                        auth: NatsAuth | None = None) -> str:
    """The digest of the dataset last prepared for `model_name` ('' if none)."""
    digest = ""
    async for _subject, event, _ts, _cached in stream_events(nats_url, idle_timeout_s=0.5,
                                                             auth=auth):
        if isinstance(event, ev.DatasetPrepared) and event.model_name == model_name:
            digest = event.dataset.digest
    return digest
