"""Who may publish and subscribe to what on NATS: one role per service, `client`, `admin`.

A service may publish exactly the events it produces (`names.PRODUCES`),
`stage.failed` and its own dead letters, and use the JetStream API only on
what it needs: the stream's info, its own durable consumers (create, info,
fetch, ack) and the key-value buckets it reads or writes (`BUCKETS`). Creating
or changing streams and buckets is `admin`'s: the supervisor of `lmforge up`
creates them all before any service starts (`bus.ensure_streams`/`ensure_kv`
only read what exists when it is there).

`client` is the CLI and any outside publisher, always of one tenant: it may
publish `lmforge.dataset.ready.<its tenant>` and no other tenant's (the tenant is a
subject token, so the server itself refuses a tenant-A credential starting a run
as tenant B; data-prep takes the tenant from the token and refuses an event
whose body names another), and ask for its tenant's runs and costs on
`lmforge.query.<events|cost>.<its tenant>` (cost-autoscaler answers,
`contracts.tenant_queries`), and nothing else: not the event stream nor the cost
ledger, which hold every tenant's runs, not even the event stream's info (its
count per subject names every tenant's `dataset.ready.<tenant>` and how many runs
each started: a client does not `ensure_streams`, the supervisor made them); no
artifact-bearing bucket, no durable consumer, no other subject. The dead-letter
stream's info it may read: the status page's count per stage (no tenant in it).
`admin` (the supervisor, `lmforge scale`, `lmforge keys`) may do anything.

Replies: every user gets its own inbox prefix (`_INBOX_<user>`), and may
subscribe only below it, so no one can listen to the answers the server sends
another user (a KV get's value is such an answer).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lmforge.contracts import subjects
from lmforge.contracts.names import CONSUMES, PRODUCES, Bucket, ServiceName, durable_name
from lmforge.contracts.tenant_queries import KINDS, PREFIX, query_subject

CLIENT = "client"
ADMIN = "admin"
DEFAULT_TENANT = "default"
"""The tenant of the `client` credential `lmforge up` generates."""
ROLES: tuple[str, ...] = (*(str(s) for s in ServiceName), CLIENT, ADMIN)
"""Every role a credential is generated for."""

MAX_REPLICAS = 64
"""Per-replica durables (each gateway replica loads every model) are allowed up to here."""

PER_REPLICA: frozenset[ServiceName] = frozenset({ServiceName.INFERENCE_GATEWAY})
"""Services whose durables are per replica (`@subscriber(..., per_replica=True)`)."""

_EVERY_SERVICE = (Bucket.STAGE_RECORDS, Bucket.STAGE_CACHE)
BUCKETS: dict[ServiceName, tuple[tuple[Bucket, ...], tuple[Bucket, ...]]] = {
    ServiceName.DATA_PREP: ((*_EVERY_SERVICE, Bucket.MODEL_DATASETS, Bucket.RUN_OWNERS), ()),
    ServiceName.SCHEDULER: (_EVERY_SERVICE, (Bucket.THROUGHPUT,)),
    ServiceName.TRAINER: ((*_EVERY_SERVICE, Bucket.THROUGHPUT), ()),
    ServiceName.QUANTIZER: (_EVERY_SERVICE, ()),
    ServiceName.EXPORTER: (_EVERY_SERVICE, ()),
    ServiceName.INFERENCE_GATEWAY: ((*_EVERY_SERVICE, Bucket.DEPLOYMENTS, Bucket.LOAD_HISTORY),
                                    (Bucket.API_KEYS,)),
    ServiceName.COST_AUTOSCALER: ((*_EVERY_SERVICE, Bucket.COST_LEDGER, Bucket.SCALE_PINS,
                                   Bucket.LOAD_HISTORY), ()),
}
"""(read-write, read-only) key-value buckets per service. A service that uses a new
bucket needs it here, or NATS refuses it with a permissions violation."""

@dataclass(frozen=True)
class Permissions:
    """What one NATS user may publish and subscribe to (nats-server `permissions`)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    answers_requests: bool = False
    """May publish one reply to each request it receives, whatever its reply subject
    (nats-server `allow_responses`): how a service answers a client's own inbox."""

    def as_config(self) -> dict[str, object]:
        config: dict[str, object] = {"publish": {"allow": list(self.publish)},
                                     "subscribe": {"allow": list(self.subscribe)}}
        if self.answers_requests:
            config["allow_responses"] = True
        return config


def inbox_prefix(user: str) -> str:
    """The reply subjects of `user`: only it may subscribe below this prefix. The user
    name is kept as it is (a subject token may hold '-'), so two users never share one:
    tenants `a-b` and `a_b` are two clients with two inboxes."""
    return f"_INBOX_{user}"


def _js(*tokens: str) -> str:
    return "$JS.API." + ".".join(tokens)


def _kv_read(bucket: Bucket) -> list[str]:
    stream = f"KV_{bucket}"
    return [_js("STREAM", "INFO", stream), _js("STREAM", "MSG", "GET", stream),
            _js("DIRECT", "GET", stream), _js("DIRECT", "GET", stream, ">"),
            # keys(): an ordered consumer over the bucket's stream
            _js("CONSUMER", "CREATE", stream), _js("CONSUMER", "CREATE", stream, ">"),
            _js("CONSUMER", "INFO", stream, ">"), _js("CONSUMER", "DELETE", stream, ">"),
            f"$JS.FC.{stream}.>"]


def _kv_write(bucket: Bucket) -> list[str]:
    return [*_kv_read(bucket), f"$KV.{bucket}.>"]


def _durable(durable: str) -> list[str]:
    stream = subjects.STREAM
    return [_js("CONSUMER", "CREATE", stream, durable),
            _js("CONSUMER", "CREATE", stream, durable, ">"),
            _js("CONSUMER", "DURABLE", "CREATE", stream, durable),
            _js("CONSUMER", "INFO", stream, durable),
            _js("CONSUMER", "MSG", "NEXT", stream, durable),
            f"$JS.ACK.{stream}.{durable}.>"]


def _durables(service: ServiceName) -> Iterable[str]:
    for subject in CONSUMES.get(service, ()):
        if service in PER_REPLICA:
            yield from (durable_name(service, subject, replica=r) for r in range(MAX_REPLICAS))
        else:
            yield durable_name(service, subject)


def _stream_info() -> list[str]:
    return [_js("STREAM", "INFO", subjects.STREAM),
            _js("STREAM", "INFO", subjects.DEAD_LETTER_STREAM)]


def service_permissions(service: ServiceName) -> Permissions:
    read_write, read_only = BUCKETS[service]
    publish = [s.name for s in PRODUCES[service]]
    publish += [subjects.STAGE_FAILED.name, f"{subjects.DEAD_LETTER_PREFIX}.{service}",
                *_stream_info()]
    for durable in _durables(service):
        publish += _durable(durable)
    for bucket in read_write:
        publish += _kv_write(bucket)
    for bucket in read_only:
        publish += _kv_read(bucket)
    subscribe = [f"{inbox_prefix(service)}.>"]
    if service == ServiceName.COST_AUTOSCALER:
        publish += [_js("CONSUMER", "LIST", subjects.STREAM),  # lag: part of its load signal
                    *_ephemeral_reader(subjects.STREAM)]  # tenants' events (tenant_queries)
        subscribe += [f"{PREFIX}.*.*"]
        return Permissions(tuple(publish), tuple(subscribe), answers_requests=True)
    return Permissions(tuple(publish), tuple(subscribe))


def _ephemeral_reader(stream: str) -> list[str]:
    """Ordered (ephemeral) consumers over `stream`: the server refuses a durable name on
    CONSUMER.CREATE.<stream>, and no consumer made this way can be fetched from."""
    return [_js("CONSUMER", "CREATE", stream), f"$JS.FC.{stream}.>"]


def client_user(tenant: str) -> str:
    """The NATS user of `tenant`'s client credential (`client` for the default one)."""
    return CLIENT if tenant in ("", DEFAULT_TENANT) else f"{CLIENT}-{tenant}"


def client_permissions(tenant: str) -> Permissions:
    """A client of `tenant`: dataset.ready and the queries on its own tenant's subjects
    only (`lmforge up`'s own `client` is the default tenant's)."""
    publish = [subjects.DATASET_READY.for_tenant(tenant),
               _js("STREAM", "INFO", subjects.DEAD_LETTER_STREAM),  # the status page
               *(query_subject(kind, tenant) for kind in KINDS)]
    return Permissions(tuple(publish), (f"{inbox_prefix(client_user(tenant))}.>",))


def admin_permissions() -> Permissions:
    return Permissions((">",), (">",))


def role_permissions(role: str, *, tenant: str = "") -> Permissions:
    """The permissions of `role`: a service name, `client` (of `tenant`) or `admin`."""
    if role == CLIENT:
        return client_permissions(tenant)
    if role == ADMIN:
        return admin_permissions()
    return service_permissions(ServiceName(role))
