"""The subject catalog: every subject and the one message type it carries.

Nobody types a subject string by hand; look it up here. `for_message` goes the
other way, so a publisher only hands over the event.
"""

from __future__ import annotations

import re
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


TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
"""A tenant name: also a subject token, so no '.', '*', '>' or spaces can ever be in one."""

NO_TENANT = "_"
"""The subject token of an event without a tenant (an open deployment); never a tenant's
name, which starts with a letter or digit."""

M = TypeVar("M", bound=Message, covariant=True)


@dataclass(frozen=True, slots=True)
class Subject(Generic[M]):
    """A subject and the one message type it carries (`Subject[ev.DatasetReady]`).

    A `tenant_scoped` subject is published on `<name>.<tenant>`: the tenant is a subject
    token, so a NATS permission on `<name>.acme` is what lets a credential speak for
    acme, and the consumer takes the tenant from the subject the server accepted, not
    from a field the publisher wrote (`lmforge.security.nats_roles`).
    """

    name: str
    message: type[M]
    tenant_scoped: bool = False

    def decode(self, data: bytes) -> M:
        """Parse `data` as this subject's message type (raises DecodeError)."""
        event = self.message()
        event.ParseFromString(data)
        return event

    @property
    def pattern(self) -> str:
        """What the stream holds and consumers filter on."""
        return f"{self.name}.*" if self.tenant_scoped else self.name

    def for_tenant(self, tenant: str) -> str:
        """The subject an event of `tenant` is published on ('' : no tenant)."""
        if not self.tenant_scoped:
            return self.name
        if tenant and not TENANT_PATTERN.match(tenant):
            raise ValueError(f"tenant {tenant!r} must be 1-63 of a-z, 0-9, '-' and '_', "
                             f"starting with a letter or digit")
        return f"{self.name}.{tenant or NO_TENANT}"

    def matches(self, subject: str) -> bool:
        """Whether a message on `subject` (as the server delivered it) is this one's."""
        if not self.tenant_scoped:
            return subject == self.name
        head, _, token = subject.rpartition(".")
        return head == self.name and bool(token)

    def tenant_of(self, subject: str) -> str:
        """The tenant in a delivered `subject` ('' for NO_TENANT or an unscoped subject)."""
        if not self.tenant_scoped or not self.matches(subject):
            return ""
        token = subject.rpartition(".")[2]
        return "" if token == NO_TENANT else token


DATASET_READY = Subject("lmforge.dataset.ready", ev.DatasetReady, tenant_scoped=True)
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
assert all("tenant" in s.message.DESCRIPTOR.fields_by_name for s in ALL if s.tenant_scoped), \
    "a tenant-scoped subject's message names its tenant"


def by_name(name: str) -> Subject[Message]:
    """The catalog entry of `name`: a catalog name, or a subject as delivered
    (`lmforge.dataset.ready.acme` is DATASET_READY)."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    found = _BY_NAME.get(name.rpartition(".")[0])
    if found is not None and found.tenant_scoped:
        return found
    raise KeyError(f"unknown subject {name!r}; known: {sorted(_BY_NAME)}")


def for_message(event: Message) -> Subject[Message]:
    try:
        return _BY_MESSAGE[type(event)]
    except KeyError:
        raise TypeError(f"{type(event).__name__} is not an event in the subject catalog") from None
