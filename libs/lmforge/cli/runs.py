"""Reading runs back from the event stream: for `lmforge run --follow` and `lmforge runs`.

The stream is the record: a run's state is folded from its events, so the
CLI needs no database and shows exactly what the services said.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import nats
import nats.errors
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError, Message

from lmforge.contracts import subjects

STAGES = ("data-prep", "scheduler", "trainer", "quantizer", "exporter", "inference-gateway")
STAGE_OF = {
    subjects.DATASET_READY.name: ("data-prep", "queued"),
    subjects.DATASET_PREPARED.name: ("data-prep", "done"),
    subjects.TRAINING_SCHEDULED.name: ("scheduler", "done"),
    subjects.TRAINING_PROGRESS.name: ("trainer", "running"),
    subjects.TRAINING_CHECKPOINTED.name: ("trainer", "running"),
    subjects.TRAINING_PREEMPTED.name: ("trainer", "preempted"),
    subjects.MODEL_TRAINED.name: ("trainer", "done"),
    subjects.MODEL_QUANTIZED.name: ("quantizer", "done"),
    subjects.MODEL_EXPORTED.name: ("exporter", "done"),
    subjects.MODEL_DEPLOYED.name: ("inference-gateway", "done"),
}


@dataclass
class RunView:
    run_id: str
    model_name: str = ""
    stage: str = "data-prep"
    status: str = "queued"
    started: float = 0.0
    updated: float = 0.0
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    perplexity: float = 0.0
    failure: str = ""
    stage_done_at: dict[str, float] = field(default_factory=dict)

    def fold(self, subject: str, event: Message, timestamp: float) -> None:
        self.started = self.started or timestamp
        self.updated = timestamp
        self.model_name = getattr(event, "model_name", "") or self.model_name
        if subject == subjects.STAGE_FAILED.name:
            self.status, self.failure = "failed", f"{event.stage}: {event.reason}"
            self.stage = event.stage
            return
        stage, status = STAGE_OF.get(subject, (self.stage, self.status))
        if status == "done":
            self.stage_done_at[stage] = timestamp
        if subject == subjects.TRAINING_PROGRESS.name:
            self.step, self.total_steps, self.loss = event.step, event.total_steps, event.loss
        if subject == subjects.TRAINING_SCHEDULED.name:
            self.total_steps = event.plan.max_steps
        if subject == subjects.MODEL_TRAINED.name:
            self.perplexity = event.heldout_perplexity
            self.step = event.steps
        if status == "done" and stage != "inference-gateway":
            nxt = STAGES[STAGES.index(stage) + 1]
            self.stage, self.status = nxt, "running"
        else:
            self.stage, self.status = stage, ("served" if stage == "inference-gateway"
                                              else status)

    @property
    def finished(self) -> bool:
        return self.status in ("served", "failed")


async def stream_events(nats_url: str, *, run_id: str | None = None, follow: bool = False,
                        idle_timeout_s: float = 1.0
                        ) -> AsyncIterator[tuple[str, Message, float]]:
    """Every event in the stream (optionally one run's), oldest first; with follow,
    keep waiting for new ones."""
    nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=-1)
    js = nc.jetstream()
    sub = await js.subscribe("lmforge.>", ordered_consumer=True, stream=subjects.STREAM)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_timeout_s)
            except nats.errors.TimeoutError:
                if follow:
                    continue
                return
            if run_id and (msg.headers or {}).get("Lmforge-Run-Id") != run_id:
                continue
            try:
                subject = subjects.by_name(msg.subject)
                event = subject.decode(msg.data)
            except (KeyError, DecodeError):
                continue
            ts = msg.metadata.timestamp.timestamp() if msg.metadata.timestamp else 0.0
            yield msg.subject, event, ts
    finally:
        await nc.close()


async def collect_runs(nats_url: str) -> dict[str, RunView]:
    runs: dict[str, RunView] = {}
    async for subject, event, ts in stream_events(nats_url, idle_timeout_s=0.5):
        run_id = getattr(event, "run_id", "")
        if not run_id or subject == subjects.SCALING_DECIDED.name:
            continue
        runs.setdefault(run_id, RunView(run_id)).fold(subject, event, ts)
    return runs


def event_json(subject: str, event: Message, ts: float) -> dict:
    return {"subject": subject, "time": ts,
            "event": MessageToDict(event, preserving_proto_field_name=True)}

