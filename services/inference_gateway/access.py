"""Who is calling: API keys, tenants and per-key rate limits, for gRPC and HTTP alike.

Open by default, and saying so: while the `lmforge_api_keys` bucket is empty
every request is served, the start-up log has one line that says the gateway
is open, and `lmforge_gateway_auth_required` is 0 (what `lmforge status`
shows). Once any key exists, every request needs one (within `refresh_s`,
no restart): missing or bad is UNAUTHENTICATED/401; a key's tenant sees only
its own models (and untenanted ones), another tenant's model is the same
NOT_FOUND/404 as a model that does not exist. Each key has a token bucket;
an empty one is RESOURCE_EXHAUSTED/429 with Retry-After.

Where the key comes from: gRPC metadata `authorization: Bearer <key>` (what
tritonclient sends given `headers={"authorization": ...}`), the OpenAI SDKs'
`Authorization: Bearer <key>`, or `x-api-key`. The key itself is never
logged, traced or kept: only its id (the part before the secret) appears in
logs and metrics.

Health (grpc.health.v1, KServe ServerLive/ServerReady) and reflection stay
open: they name no model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from lmforge.security.api_keys import ApiKeyBook, ApiKeyRecord, split_key
from services.inference_gateway.errors import RateLimited, Unauthenticated

log = logging.getLogger("lmforge.gateway.access")

AUTH_REQUIRED = Gauge("lmforge_gateway_auth_required",
                      "1 when API keys are required (any key exists), 0 while serving openly")
TLS_ON = Gauge("lmforge_gateway_tls", "1 when the gateway's gRPC and HTTP ports use TLS")
REFUSED = Counter("lmforge_gateway_refused_total", "Requests refused before any work, by why",
                  ["reason"])

caller_tenant: ContextVar[str | None] = ContextVar("lmforge_caller_tenant", default=None)
"""The tenant of the request being served; None: the gateway is open (no keys exist)."""

OPEN_METHODS = frozenset({
    "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
})
OPEN_SERVICE_PREFIXES = ("/grpc.reflection.",)


def is_open_method(method: str) -> bool:
    return method in OPEN_METHODS or method.startswith(OPEN_SERVICE_PREFIXES)


def key_from_headers(headers: Iterable[tuple[str, str | bytes]]) -> str:
    """The API key in `authorization: Bearer …` or `x-api-key`, or ''."""
    for name, value in headers:
        lowered = name.lower()
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        if lowered == "authorization":
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
        elif lowered == "x-api-key":
            return text.strip()
    return ""


@dataclass
class TokenBucket:
    rate_per_s: float
    burst: float
    tokens: float = -1.0
    updated: float = field(default_factory=time.monotonic)

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one is there."""
        if self.tokens < 0:
            self.tokens = self.burst
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate_per_s


class AccessControl:
    """The keys this replica knows (refreshed from the bucket) and their buckets."""

    def __init__(self, book: ApiKeyBook | None, *, rate_per_s: float, burst: int,
                 refresh_s: float = 1.0) -> None:
        self.book = book
        self.rate_per_s, self.burst, self.refresh_s = rate_per_s, burst, refresh_s
        self.keys: dict[str, ApiKeyRecord] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._verified: dict[str, str] = {}
        """key -> key id for keys already checked (a hash per request is the overhead)."""
        self._said_open: bool | None = None

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def use(self, keys: dict[str, ApiKeyRecord]) -> None:
        """Take the bucket's current keys: a revoked key stops working here."""
        if keys.keys() != self.keys.keys():
            self._verified = {k: v for k, v in self._verified.items() if v in keys}
            self._buckets = {k: v for k, v in self._buckets.items() if k in keys}
        self.keys = keys
        AUTH_REQUIRED.set(1 if keys else 0)
        if self._said_open is not (not keys):
            self._said_open = not keys
            if keys:
                log.info("API keys required: %d key(s) for %d tenant(s)", len(keys),
                         len({r.tenant for r in keys.values()}))
            else:
                log.warning("serving OPENLY: no API keys exist, every request is served "
                            "(create one with `lmforge keys create --tenant T`)")

    async def refresh(self) -> None:
        if self.book is not None:
            self.use(await self.book.all())

    async def follow(self, stop: asyncio.Event) -> None:
        """Re-read the keys every `refresh_s` until `stop` (a failed read keeps the last)."""
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception as exc:  # NATS reconnecting: keep the keys we have
                log.warning("cannot read the API keys (keeping the last %d): %s",
                            len(self.keys), type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.refresh_s)

    def admit(self, key: str) -> str | None:
        """The caller's tenant (None while open), or raise Unauthenticated / RateLimited."""
        if not self.keys:
            return None
        key_id = self._verified.get(key)
        if key_id is None:
            parts = split_key(key) if key else None
            record = self.keys.get(parts[0]) if parts else None
            if parts is None or record is None or not record.matches(parts[1]):
                REFUSED.labels("missing_key" if not key else "bad_key").inc()
                raise Unauthenticated("a valid API key is required: send 'authorization: "
                                      "Bearer <key>' (create one with `lmforge keys create`)")
            key_id = record.key_id
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[key] = key_id
        record = self.keys[key_id]
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets[key_id] = TokenBucket(
                record.rate_per_s or self.rate_per_s, float(record.burst or self.burst))
        wait = bucket.take(time.monotonic())
        if wait > 0:
            REFUSED.labels("rate_limited").inc()
            raise RateLimited(f"API key {key_id} is over its rate limit of "
                              f"{bucket.rate_per_s:g} requests/s", math.ceil(wait))
        return record.tenant


def visible_to(model_tenant: str, caller: str | None) -> bool:
    """Whether a model of `model_tenant` exists for `caller` (None: the gateway is open;
    an untenanted model — remote, or from before tenants — is everyone's)."""
    return caller is None or not model_tenant or model_tenant == caller
