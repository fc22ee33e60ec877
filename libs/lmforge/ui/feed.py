"""The status page's picture of lmforge, kept current by a thread of its own.

Why a follower and not `collect_runs` per request: `lmforge runs` reads the whole
event stream from its first message on every call, and a page polled once a second
would do that once a second per open tab. The feed instead follows the stream once
(`stream_events(follow=True)`, the same reader as `run --follow`, so a NATS restart
is waited out and nothing is folded twice) into the same `RunView`s the CLI folds,
and a poll costs a lock and a copy. The cost ledger and the dead-letter counts are
small and re-read every `refresh_s`; the services (the supervisor's state file and
the gateway replicas' /metrics, what `lmforge status --json` reads) at most once a
`services_ttl_s`, on request.

The feed reads what the CLI may read, with the CLI's credential (the `client` role of
the running `lmforge up`): the stream, the cost ledger, and the dead-letter stream's
info (counts per stage; the reasons are in the `stage.failed` events, which the
client role may read, not in the dead letters, which it may not). When `lmforge up`
is restarted (a new supervisor pid) the feed starts over with its credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from google.protobuf.message import Message

from lmforge.cli.runs import RunView, connect_nats, number_queue, run_json, stream_events
from lmforge.contracts import subjects
from lmforge.contracts.names import ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.security.nats_connect import NatsAuth

log = logging.getLogger("lmforge.ui")

RECENT_EVENTS = 40
"""Events kept for the page, newest first (a run's progress events count as one)."""
RECENT_FAILURES = 20
COALESCED = (subjects.TRAINING_PROGRESS.name, subjects.TRAINING_CHECKPOINTED.name)
"""Events that come once a second or so while a run trains: the list keeps a run's latest."""
HIDDEN_STATE = ("client_creds", "admin_creds", "ca")
"""Where the NATS secrets lie: not for a page any local browser may open."""


def describe_event(event: Message) -> str:
    """A few words on what an event says, for the page's list of recent events."""
    if isinstance(event, ev.DatasetReady):
        return f"dataset {event.dataset_uri}"
    if isinstance(event, ev.DatasetPrepared):
        return f"kept {event.stats.records_kept}/{event.stats.records_read} documents"
    if isinstance(event, ev.TrainingScheduled):
        return (f"{event.plan.max_steps} steps of {event.plan.preset or 'a custom model'} "
                f"on {event.plan.device or 'cpu'}, attempt {event.attempt}")
    if isinstance(event, ev.TrainingProgress):
        return f"step {event.step}/{event.total_steps} loss {event.loss:.3f}"
    if isinstance(event, ev.TrainingCheckpointed):
        return (f"step {event.step} in {event.checkpoint_seconds:.2f}s, next in "
                f"{event.next_interval} steps")
    if isinstance(event, ev.TrainingPreempted):
        return f"at step {event.step}: {event.reason}"
    if isinstance(event, ev.ModelTrained):
        return f"{event.steps} steps, held-out perplexity {event.heldout_perplexity:.2f}"
    if isinstance(event, ev.ModelQuantized):
        return f"{event.method}, perplexity {event.perplexity_after:.2f}"
    if isinstance(event, ev.ModelExported):
        return (f"version {event.version}, ONNX opset {event.onnx_opset} within "
                f"{event.onnx_max_abs_diff:.1e} of PyTorch")
    if isinstance(event, ev.ModelDeployed):
        return f"serving {event.model_name} {event.version} at {event.precision or 'fp'}"
    if isinstance(event, ev.StageFailed):
        return f"{event.stage}: {event.reason}"
    if isinstance(event, ev.ScalingDecided):
        return ", ".join(f"{s.service}={s.replicas}" + (" (pinned)" if s.pinned else "")
                         for s in event.services)
    return ""


async def dead_letter_counts(nats_url: str, auth: NatsAuth) -> dict[str, int]:
    """Messages in the dead-letter stream per stage (`lmforge.deadletter.<stage>`)."""
    nc = await connect_nats(nats_url, auth=auth)
    try:
        info = await nc.jetstream().stream_info(subjects.DEAD_LETTER_STREAM,
                                                subjects_filter=">")
    finally:
        await nc.close()
    prefix = subjects.DEAD_LETTER_PREFIX + "."
    return {subject.removeprefix(prefix): count
            for subject, count in sorted((info.state.subjects or {}).items())}


class StatusFeed:
    """Everything the page shows, as one JSON-ready dict (`snapshot()`)."""

    def __init__(self, home: Path, *, nats_url: Callable[[], str],
                 nats_auth: Callable[[], NatsAuth], refresh_s: float = 3.0,
                 services_ttl_s: float = 1.0) -> None:
        self.home = home
        self._nats_url = nats_url
        self._nats_auth = nats_auth
        self.refresh_s = refresh_s
        self.services_ttl_s = services_ttl_s
        self._lock = threading.Lock()
        self._runs: dict[str, RunView] = {}
        self._events: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self._failures: deque[dict[str, Any]] = deque(maxlen=RECENT_FAILURES)
        self._ledger: dict[str, dict[str, Any]] = {}
        self._serving: dict[str, Any] = {}
        self._dead_letters: dict[str, int] = {}
        self._notes: dict[str, str] = {}
        """What could not be read, and why, by source ('stream', 'ledger', ...)."""
        self._status: dict[str, Any] | None = None
        self._status_read_at = 0.0
        self._status_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # -- the follower thread --------------------------------------------------------

    def start(self) -> StatusFeed:
        ready = threading.Event()

        async def follow() -> None:
            self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
            ready.set()
            await self._follow_lmforge()

        def run() -> None:
            # asyncio.run, so the tasks nats-py leaves behind are cancelled at the end.
            asyncio.run(follow())

        self._thread = threading.Thread(target=run, name="status-feed", daemon=True)
        self._thread.start()
        ready.wait()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout_s)

    async def _sleep(self, seconds: float) -> None:
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _follow_lmforge(self) -> None:
        """Follow the running `lmforge up`; start over when it is replaced by another."""
        from lmforge.cli.up import read_state

        assert self._stopping is not None
        while not self._stopping.is_set():
            state = read_state(self.home)
            if state is None:
                self._note("lmforge", f"lmforge is not running with home {self.home} "
                                      f"(start it with `lmforge up -d`)")
                await self._sleep(1.0)
                continue
            self._note("lmforge", "")
            pid, auth = state.get("pid"), self._nats_auth()
            with self._lock:
                self._runs.clear()
                self._events.clear()
                self._failures.clear()
            follower = asyncio.create_task(self._follow_stream(auth))
            try:
                while not follower.done() and not self._stopping.is_set():
                    await self._refresh(auth)
                    await self._sleep(self.refresh_s)
                    current = read_state(self.home)
                    if current is None or current.get("pid") != pid:
                        break
            finally:
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follower
            if follower.done() and not follower.cancelled() and follower.exception():
                self._note("stream", f"reading the event stream failed: "
                                     f"{follower.exception()!r}")
                await self._sleep(1.0)

    async def _follow_stream(self, auth: NatsAuth) -> None:
        def connection(line: str) -> None:
            self._note("stream", line)

        async for subject, event, ts, cached_from in stream_events(
                self._nats_url, follow=True, auth=auth, on_connection=connection):
            with self._lock:
                self.fold(subject, event, ts, cached_from=cached_from)

    async def _refresh(self, auth: NatsAuth) -> None:
        from lmforge.cli.cost import read_ledger

        try:
            ledger, serving = await read_ledger(self._nats_url, auth=auth)
        except (ConnectionError, nats.errors.Error, OSError) as exc:
            self._note("ledger", f"cost ledger not readable: {exc}")
        else:
            with self._lock:
                self._ledger, self._serving = ledger, serving
            self._note("ledger", "")
        try:
            dead = await dead_letter_counts(self._nats_url(), auth)
        except nats.js.errors.NotFoundError:
            dead = {}  # no message has been dead-lettered since the stream was made
        except (ConnectionError, nats.errors.Error, OSError) as exc:
            self._note("dead letters", f"dead-letter stream not readable: {exc}")
            return
        with self._lock:
            self._dead_letters = dead
        self._note("dead letters", "")

    def _note(self, source: str, line: str) -> None:
        with self._lock:
            if line:
                self._notes[source] = line
            else:
                self._notes.pop(source, None)

    # -- folding (the follower thread, under the lock) ------------------------------

    def fold(self, subject: str, event: Message, ts: float, *, cached_from: str = "") -> None:
        """Take in one event: into its run (as `collect_runs` does), the recent events and,
        for `stage.failed`, the failures."""
        run_id = getattr(event, "run_id", "")
        scaling = subject == subjects.SCALING_DECIDED.name
        if run_id and not scaling:
            self._runs.setdefault(run_id, RunView(run_id)).fold(subject, event, ts,
                                                                cached_from=cached_from)
        entry = {"time": ts, "subject": subject.removeprefix("lmforge."),
                 "run_id": "" if scaling else run_id, "summary": describe_event(event),
                 "reused_from": cached_from}
        if subject in COALESCED:
            # One line per run and kind, at its latest step: the older one goes.
            for index, old in enumerate(self._events):
                if old["subject"] == entry["subject"] and old["run_id"] == run_id:
                    del self._events[index]
                    break
        self._events.append(entry)
        if isinstance(event, ev.StageFailed):
            self._failures.append({"time": ts, "run_id": run_id, "stage": event.stage,
                                   "subject": event.subject, "reason": event.reason,
                                   "deliveries": event.deliveries,
                                   "dead_lettered": event.dead_lettered})

    # -- what the page reads (any request thread) -----------------------------------

    def services_status(self) -> dict[str, Any] | None:
        """`lmforge status --json`, read at most once every `services_ttl_s`."""
        from lmforge.cli.status import read_status

        with self._status_lock:
            if time.monotonic() - self._status_read_at >= self.services_ttl_s:
                self._status = read_status(self.home)
                self._status_read_at = time.monotonic()
            return self._status

    def snapshot(self) -> dict[str, Any]:
        """Services, runs, recent events and failures, served models and cost, as JSON."""
        status = self.services_status()
        with self._lock:
            number_queue(self._runs.values())
            runs = [run_json(run, self._ledger) for run in
                    sorted(self._runs.values(), key=lambda r: r.started, reverse=True)]
            events = list(reversed(self._events))
            failures = list(reversed(self._failures))
            ledger, serving = dict(self._ledger), dict(self._serving)
            dead_letters = dict(self._dead_letters)
            notes = list(self._notes.values())
        lmforge: dict[str, Any] = {"running": status is not None}
        services: list[dict[str, Any]] = []
        models: list[dict[str, Any]] = []
        if status is not None:
            nats_state = {k: v for k, v in (status.get("nats") or {}).items()
                          if k not in HIDDEN_STATE}
            lmforge.update({k: status.get(k) for k in ("nats_url", "gateway", "openai_base_url",
                                                       "home")}, nats=nats_state)
            services = [{"name": name, **service}
                        for name, service in (status.get("services") or {}).items()]
            gateway = (status.get("services") or {}).get(ServiceName.INFERENCE_GATEWAY) or {}
            models, model_notes = served_models(gateway.get("models", []))
            notes += model_notes
        runs_usd = sum((entry.get("total_usd") or 0.0 for entry in ledger.values()), 0.0)
        serving_usd = serving.get("cost_usd") or 0.0
        return {
            "generated": time.time(), "lmforge": lmforge, "services": services, "runs": runs,
            "events": events, "failures": failures, "dead_letters": dead_letters,
            "models": models,
            "cost": {"runs_usd": runs_usd, "serving_usd": serving_usd,
                     "total_usd": runs_usd + serving_usd, "serving": serving},
            "notes": notes,
        }


def served_models(replicas: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The gateway replicas' models ("name version") with their precision and which
    replicas serve them; and a note for every replica loading, failing or silent."""
    models: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for replica in replicas:
        index = replica["replica"]
        if "metrics" in replica:
            notes.append(f"gateway replica {index}: metrics {replica['metrics']}")
            continue
        for model, precision in replica.get("precision", {}).items():
            entry = models.setdefault(model, {"model": model, "precision": precision,
                                              "replicas": []})
            entry["replicas"].append(index)
        if replica.get("models_pending"):
            notes.append(f"gateway replica {index}: loading {replica['models_pending']} "
                         f"model(s)")
        for model, failures in replica.get("load_failures", {}).items():
            notes.append(f"gateway replica {index}: {failures} failed load(s) of {model}")
    return sorted(models.values(), key=lambda m: m["model"]), notes
