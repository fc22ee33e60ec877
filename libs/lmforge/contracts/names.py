"""The name catalog: services, key-value buckets, headers and durable consumers.

A name used in two places is defined here once and imported everywhere else;
nobody recovers a service from a consumer's name by splitting strings. The
subject catalog (`subjects.py`) holds the subjects and their message types;
this module says who consumes which.
"""

from __future__ import annotations

from enum import StrEnum

from lmforge.contracts import subjects
from lmforge.contracts.subjects import Subject


class ServiceName(StrEnum):
    """The seven services, as the supervisor, the CLI and the autoscaler call them."""

    DATA_PREP = "data-prep"
    SCHEDULER = "scheduler"
    TRAINER = "trainer"
    QUANTIZER = "quantizer"
    EXPORTER = "exporter"
    INFERENCE_GATEWAY = "inference-gateway"
    COST_AUTOSCALER = "cost-autoscaler"


SERVICES: tuple[ServiceName, ...] = tuple(ServiceName)
"""Every service, in pipeline order (start order for the supervisor)."""


class Bucket(StrEnum):
    """JetStream key-value buckets."""

    STAGE_RECORDS = "lmforge_stage_records"
    """Events already handled, per durable consumer: a redelivery is a no-op."""
    STAGE_CACHE = "lmforge_stage_cache"
    """A stage's outputs keyed by the digest of its inputs and config, across runs."""
    DEPLOYMENTS = "lmforge_deployments"
    """The models the gateway serves, so a restarted replica restores them."""
    SCALE_PINS = "lmforge_scale_pins"
    """Replica counts pinned by an SRE (`lmforge scale`)."""
    COST_LEDGER = "lmforge_cost_ledger"
    """Dollars per run, written by the autoscaler."""
    LOAD_HISTORY = "lmforge_load_history"
    """The gateway's request rate and backlog per 5-minute bucket (the forecast's history)."""
    MODEL_DATASETS = "lmforge_model_datasets"
    """The last dataset prepared for each model name (its near-dup index dedups the next)."""
    THROUGHPUT = "lmforge_throughput"
    """Measured training FLOP/s per instance type and precision (lmforge.calibration)."""
    API_KEYS = "lmforge_api_keys"
    """Gateway API keys by key id: tenant, salt and salted hash, never the key itself."""
    RUN_OWNERS = "lmforge_run_owners"
    """The tenant each run id belongs to: the first to use it (`lmforge.run_owners`)."""


class Header(StrEnum):
    """NATS message headers that lmforge sets or reads."""

    MSG_ID = "Nats-Msg-Id"
    RUN_ID = "Lmforge-Run-Id"
    SCHEMA = "Lmforge-Schema"
    FAILURE_REASON = "Lmforge-Failure-Reason"
    ORIGINAL_SUBJECT = "Lmforge-Original-Subject"
    WORK_STARTED_NS = "Lmforge-Work-Started-Ns"
    """On events a handler published: when that handler began its work (time_ns)."""
    PUBLISHED_NS = "Lmforge-Published-Ns"
    """On events a handler published: when it published them (time_ns); with
    WORK_STARTED_NS, the wall time the stage spent (the cost ledger prices it)."""
    TENANT = "Lmforge-Tenant"
    """The tenant of the run: set from dataset.ready, carried onto every event caused
    by it (`dispatch.Delivery.publish`)."""
    CACHED_FROM = "Lmforge-Cached-From"
    """On an event replayed from the stage cache: the run that did the work."""


CONSUMES: dict[ServiceName, tuple[Subject, ...]] = {
    ServiceName.DATA_PREP: (subjects.DATASET_READY,),
    ServiceName.SCHEDULER: (subjects.DATASET_PREPARED, subjects.TRAINING_PREEMPTED),
    ServiceName.TRAINER: (subjects.TRAINING_SCHEDULED,),
    ServiceName.QUANTIZER: (subjects.MODEL_TRAINED,),
    ServiceName.EXPORTER: (subjects.MODEL_QUANTIZED,),
    ServiceName.INFERENCE_GATEWAY: (subjects.MODEL_EXPORTED,),
    # The cost ledger prices every stage from the event that closes it.
    ServiceName.COST_AUTOSCALER: (subjects.DATASET_PREPARED, subjects.TRAINING_SCHEDULED,
                                  subjects.TRAINING_PREEMPTED, subjects.MODEL_TRAINED,
                                  subjects.MODEL_QUANTIZED, subjects.MODEL_EXPORTED),
}
"""The subjects each service consumes (checked by the bus when a handler registers)."""

PRODUCES: dict[ServiceName, tuple[Subject, ...]] = {
    ServiceName.DATA_PREP: (subjects.DATASET_PREPARED,),
    ServiceName.SCHEDULER: (subjects.TRAINING_SCHEDULED,),
    ServiceName.TRAINER: (subjects.TRAINING_PROGRESS, subjects.TRAINING_CHECKPOINTED,
                          subjects.TRAINING_PREEMPTED, subjects.MODEL_TRAINED),
    ServiceName.QUANTIZER: (subjects.MODEL_QUANTIZED,),
    ServiceName.EXPORTER: (subjects.MODEL_EXPORTED,),
    ServiceName.INFERENCE_GATEWAY: (subjects.MODEL_DEPLOYED,),
    ServiceName.COST_AUTOSCALER: (subjects.SCALING_DECIDED,),
}
"""The subjects each service publishes besides `stage.failed` and its dead letters: with
NATS security on (`lmforge.security.nats_roles`), exactly what it may publish."""


def durable_name(service: str, subject: Subject, *, replica: int | None = None) -> str:
    """The durable consumer of `service` on `subject`.

    Replicas share one durable (a work queue) unless `replica` is given, for work
    every replica must do (each gateway replica loads every model).
    """
    base = f"{service}__{subject.name.removeprefix('lmforge.').replace('.', '_')}"
    return base if replica is None else f"{base}__r{replica}"


_OWNERS: dict[str, ServiceName] = {
    durable_name(service, subject): service
    for service, consumed in CONSUMES.items() for subject in consumed
}


def consumer_owner(durable: str, *, max_replicas: int = 64) -> ServiceName | None:
    """The service that owns durable consumer `durable`, or None for one we did not create."""
    if durable in _OWNERS:
        return _OWNERS[durable]
    for service, consumed in CONSUMES.items():
        for subject in consumed:
            if any(durable == durable_name(service, subject, replica=r)
                   for r in range(max_replicas)):
                return service
    return None
