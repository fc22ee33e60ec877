"""The subject catalog: every subject and the one message type it carries.

Nobody types a subject string by hand; look it up here. `for_message` goes the
other way, so a publisher only hands over the event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import Message

from lmforge.contracts.v1 import events_pb2 as ev

STREAM = "LMFORGE"
"""The file-backed stream that holds every pipeline event."""

DEAD_LETTER_STREAM = "LMFORGE_DEAD_LETTERS"
DEAD_LETTER_PREFIX = "lmforge.deadletter"
"""Poison messages go to `lmforge.deadletter.<stage>` with the reason in headers."""

SCHEMA_VERSION = 1
"""Highest event schema version this build understands (header `Lmforge-Schema`)."""


M = TypeVar("M", bound=Message, covariant=True)


@dataclass(frozen=True, slots=True)
class Subject(Generic[M]):
    """A subject and the one message type it carries (`Subject[ev.DatasetReady]`)."""

    name: str
    message: type[M]

    def decode(self, data: bytes) -> M:
        """Parse `data` as this subject's message type (raises DecodeError)."""
        event = self.message()
        event.ParseFromString(data)
        return event


DATASET_READY = Subject("lmforge.dataset.ready", ev.DatasetReady)
DATASET_PREPARED = Subject("lmforge.dataset.prepared", ev.DatasetPrepared)
TRAINING_SCHEDULED = Subject("lmforge.training.scheduled", ev.TrainingScheduled)
TRAINING_PROGRESS = Subject("lmforge.training.progress", ev.TrainingProgress)
TRAINING_CHECKPOINTED = Subject("lmforge.training.checkpointed", ev.TrainingCheckpointed)
TRAINING_PREEMPTED = Subject("lmforge.training.preempted", ev.TrainingPreempted)
MODEL_TRAINED = Subject("lmforge.model.trained", ev.ModelTrained)
MODEL_QUANTIZED = Subject("lmforge.model.quantized", ev.ModelQuantized)
MODEL_EXPORTED = Subject("lmforge.model.exported", ev.ModelExported)
MODEL_DEPLOYED = Subject("lmforge.model.deployed", ev.ModelDeployed)
STAGE_FAILED = Subject("lmforge.stage.failed", ev.StageFailed)
SCALING_DECIDED = Subject("lmforge.scaling.decided", ev.ScalingDecided)

ALL: tuple[Subject[Message], ...] = (
    DATASET_READY,
    DATASET_PREPARED,
    TRAINING_SCHEDULED,
    TRAINING_PROGRESS,
    TRAINING_CHECKPOINTED,
    TRAINING_PREEMPTED,
    MODEL_TRAINED,
    MODEL_QUANTIZED,
    MODEL_EXPORTED,
    MODEL_DEPLOYED,
    STAGE_FAILED,
    SCALING_DECIDED,
)

_BY_NAME = {s.name: s for s in ALL}
_BY_MESSAGE = {s.message: s for s in ALL}
assert len(_BY_MESSAGE) == len(ALL), "one subject, one message type"


def by_name(name: str) -> Subject[Message]:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown subject {name!r}; known: {sorted(_BY_NAME)}") from None


def for_message(event: Message) -> Subject[Message]:
    try:
        return _BY_MESSAGE[type(event)]
    except KeyError:
        raise TypeError(f"{type(event).__name__} is not an event in the subject catalog") from None
