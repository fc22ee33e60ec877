"""Gateway API keys: created once, shown once, stored only as a salted hash.

A key reads `lmf_<key id>_<secret>`: the id (public, 8 bytes) finds its record
in the `lmforge_api_keys` bucket, the secret (32 random bytes) is checked
against the record's salted SHA-256. A fast hash is the right one here: the
secret has 256 bits of entropy, so there is nothing to brute-force, and the
gateway checks it on every request (a slow KDF would be the overhead). The
comparison is constant-time.

`lmforge keys create|list|revoke` writes the bucket (as `admin`); each gateway
replica reads it every `refresh_s` (a second by default), so a created or
revoked key counts everywhere within seconds, with no restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass

from lmforge.contracts.subjects import TENANT_PATTERN
from lmforge.dispatch import KeyValue

KEY_PREFIX = "lmf"
_KEY = re.compile(rf"^{KEY_PREFIX}_([0-9a-f]{{16}})_([A-Za-z0-9_-]{{20,100}})$")


class InvalidTenant(ValueError):
    pass


def check_tenant(tenant: str) -> str:
    if not TENANT_PATTERN.match(tenant):
        raise InvalidTenant(f"tenant {tenant!r} must be 1-63 of a-z, 0-9, '-' and '_', "
                            f"starting with a letter or digit")
    return tenant


@dataclass(frozen=True)
class ApiKeyRecord:
    """What is stored of a key: never the key."""

    key_id: str
    tenant: str
    salt: str
    digest: str
    created: float
    rate_per_s: float = 0.0
    """Requests per second this key may make on average (0: the gateway's default)."""
    burst: int = 0
    """Requests it may make at once (0: the gateway's default)."""

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(_digest(self.salt, secret), self.digest)

    def public(self) -> dict[str, object]:
        """What `lmforge keys list` shows: no salt, no digest."""
        return {"key_id": self.key_id, "tenant": self.tenant, "created": self.created,
                "rate_per_s": self.rate_per_s, "burst": self.burst}

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> ApiKeyRecord:
        return cls(**json.loads(data))


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def split_key(key: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    found = _KEY.match(key.strip())
    return (found.group(1), found.group(2)) if found else None


def new_key(tenant: str, *, rate_per_s: float = 0.0, burst: int = 0
            ) -> tuple[str, ApiKeyRecord]:
    """A fresh key (to show once) and the record to store."""
    key_id, secret, salt = secrets.token_hex(8), secrets.token_urlsafe(32), secrets.token_hex(16)
    record = ApiKeyRecord(key_id=key_id, tenant=check_tenant(tenant), salt=salt,
                          digest=_digest(salt, secret), created=time.time(),
                          rate_per_s=rate_per_s, burst=burst)
    return f"{KEY_PREFIX}_{key_id}_{secret}", record


class ApiKeyBook:
    """The keys in a key-value bucket (`Bucket.API_KEYS`), by key id."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def create(self, tenant: str, *, rate_per_s: float = 0.0, burst: int = 0) -> str:
        key, record = new_key(tenant, rate_per_s=rate_per_s, burst=burst)
        await self.kv.put(record.key_id, record.encode())
        return key

    async def revoke(self, key_id: str) -> bool:
        if await self.kv.get(key_id) is None:
            return False
        await self.kv.delete(key_id)
        return True

    async def all(self) -> dict[str, ApiKeyRecord]:
        records: dict[str, ApiKeyRecord] = {}
        for key_id in await self.kv.keys():
            data = await self.kv.get(key_id)
            if data:
                records[key_id] = ApiKeyRecord.decode(data)
        return records
