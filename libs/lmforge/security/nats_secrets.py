"""NATS credentials and the nats-server configuration that enforces them.

`ensure_nats_secrets(<home>/secrets)` is what `lmforge up` runs before starting
the server (and `lmforge secrets DIR` for docker-compose):

  secrets/                     0700
    nats/<role>.json           0600  {"user", "password", "role", "tenant"}: one per
                                     service, `client` and `admin`
    tls/ca.pem, server.pem     the CA services verify the server against, its cert
    tls/*-key.pem              0600
    nats-server.conf           0600  users with a bcrypt hash of their password, their
                                     permissions (nats_roles) and TLS

Credentials and certificates already there (an earlier `up`, or the
operator's own) are kept; the server configuration is rendered again on every
call, so a newer build's permissions apply at the next start, and written only
when it differs: a user's hash that still verifies its password is kept, so
running `up` or `lmforge secrets` again with nothing new leaves it byte for
byte as it was. Passwords are
256-bit random tokens; they never appear on a command line, in the environment
(services read their credential file, named by LMFORGE_NATS_CREDS) or in the
server configuration: it holds only their bcrypt hashes (nats-server takes a
`$2b$` hash in `password` and checks what a client presents against it), so
whoever reads it, or the NATS container's volume, holds no usable credential.
A configuration an older lmforge wrote with plaintext passwords is rewritten
hashed at the next `up` (or `tenants create`), and one log line says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import bcrypt

from lmforge.contracts.subjects import TENANT_PATTERN
from lmforge.runtime.nats_server import EMBEDDED_SERVER_NAME
from lmforge.security.nats_roles import (
    CLIENT,
    DEFAULT_TENANT,
    ROLES,
    client_user,
    inbox_prefix,
    role_permissions,
)
from lmforge.security.secret_files import owner_of, secure_dir, update_secret, write_secret
from lmforge.security.tls_certs import ServerTls, ensure_server_tls

TLS_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")

BCRYPT_COST = 8
"""bcrypt's work factor. It is not what protects a generated password (a 256-bit token
cannot be guessed at any cost), only a weak one an operator supplied, and nats-server
pays it on every connection and `up` on every credential. Measured on the 2-core dev
machine under load: a TLS connect takes a median 16 ms at 8, 103 ms at 10 (Go's
default; 2.5 ms with plaintext), and rendering 9 users 0.26 s at 8, 0.96 s at 10."""
BCRYPT_MAX_BYTES = 72
"""bcrypt reads no further; both Python's bcrypt and nats-server's refuse longer."""

log = logging.getLogger("lmforge.security.nats_secrets")


@dataclass(frozen=True)
class NatsCredential:
    """One NATS user: what a process presents when it connects."""

    user: str
    password: str
    role: str
    tenant: str = ""
    """The tenant a `client` credential speaks for ('' for services and admin)."""

    @property
    def inbox_prefix(self) -> str:
        return inbox_prefix(self.user)

    def __repr__(self) -> str:  # never the password, whatever logs it
        return f"NatsCredential(user={self.user!r}, role={self.role!r}, tenant={self.tenant!r})"

    @classmethod
    def load(cls, path: Path) -> NatsCredential:
        try:
            data = json.loads(path.read_text())
            return cls(user=str(data["user"]), password=str(data["password"]),
                       role=str(data["role"]), tenant=str(data.get("tenant", "")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read the NATS credential {path}: "
                             f"{type(exc).__name__}: {exc}") from None

    def save(self, path: Path) -> None:
        write_secret(path, json.dumps(asdict(self), indent=1).encode())


def new_credential(role: str, *, user: str = "", tenant: str = "") -> NatsCredential:
    return NatsCredential(user=user or role, password=secrets.token_urlsafe(32), role=role,
                          tenant=tenant)


@dataclass(frozen=True)
class NatsSecrets:
    """Where the secrets of one lmforge home (or one compose deployment) are."""

    root: Path

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def server_config(self) -> Path:
        return self.root / "nats-server.conf"

    @property
    def tls(self) -> ServerTls:
        return ServerTls(ca=self.tls_dir / "ca.pem", cert=self.tls_dir / "server.pem",
                         key=self.tls_dir / "server-key.pem")

    def credential_path(self, role: str) -> Path:
        return self.root / "nats" / f"{role}.json"

    def client_path(self, tenant: str) -> Path:
        """The client credential of `tenant` (`nats/client.json` for the default tenant)."""
        return self.credential_path(client_user(tenant))

    def credentials(self) -> list[NatsCredential]:
        return [NatsCredential.load(p) for p in sorted((self.root / "nats").glob("*.json"))]

    def tenants(self) -> list[str]:
        """The tenants that hold a client credential."""
        return sorted({c.tenant for c in self.credentials() if c.role == CLIENT})


def is_bcrypt(password: str) -> bool:
    """nats-server's own test: a value like this in `password` is a hash to check against."""
    return re.match(r"^\$2[abxy]\$\d{2}\$", password) is not None


def hash_password(cred: NatsCredential, *, kept: str = "") -> str:
    """The bcrypt hash of `cred`'s password, for the server configuration: `kept` (the
    hash the configuration holds now) when it still verifies the password, else a new one.
    A new salt each time would change the configuration on every `up` with nothing new."""
    secret = cred.password.encode()
    if len(secret) > BCRYPT_MAX_BYTES or not secret:
        raise ValueError(f"the NATS password of {cred.user!r} is {len(secret)} bytes: it must "
                         f"be 1-{BCRYPT_MAX_BYTES} (bcrypt reads no further)")
    if is_bcrypt(kept):
        with contextlib.suppress(ValueError):  # not a hash bcrypt can read: a new one
            if bcrypt.checkpw(secret, kept.encode()):
                return kept
    return bcrypt.hashpw(secret, bcrypt.gensalt(BCRYPT_COST)).decode()


def render_server_config(secrets_: NatsSecrets, *, paths_root: Path | None = None) -> str:
    """The nats-server configuration (JSON, which its parser reads): TLS on the client
    port, every credential's user, password hash and role's permissions. `paths_root`:
    where the secrets directory is mounted for the server (a container), if not where it
    is here."""
    root = paths_root or secrets_.root
    tls = secrets_.tls
    kept = configured_passwords(secrets_.server_config)
    users = []
    for cred in secrets_.credentials():
        users.append({"user": cred.user,
                      "password": hash_password(cred, kept=kept.get(cred.user, "")),
                      "permissions": role_permissions(cred.role,
                                                      tenant=cred.tenant).as_config()})
    config = {
        "server_name": EMBEDDED_SERVER_NAME,
        "tls": {"cert_file": str(root / tls.cert.relative_to(secrets_.root)),
                "key_file": str(root / tls.key.relative_to(secrets_.root)),
                "ca_file": str(root / tls.ca.relative_to(secrets_.root)),
                "timeout": 5},
        "authorization": {"users": users},
        "max_payload": 8 << 20,
    }
    return json.dumps(config, indent=1)


def configured_passwords(config: Path) -> dict[str, str]:
    """user -> the `password` (a hash, or plaintext an older lmforge wrote) an existing
    server configuration holds; {} if there is none or it is not lmforge's JSON."""
    try:
        users = json.loads(config.read_text())["authorization"]["users"]
        return {str(u["user"]): str(u.get("password", "")) for u in users}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def plaintext_users(config: Path) -> list[str]:
    """The users of an existing server configuration whose password is not a hash (one an
    older lmforge wrote); none if there is no configuration or it is not lmforge's JSON."""
    return [user for user, password in configured_passwords(config).items()
            if not is_bcrypt(password)]


def write_server_config(secrets_: NatsSecrets, *, paths_root: Path | None = None) -> None:
    """Render the server configuration and write it (0600) if it differs from the file
    there, keeping that file's owner. Credentials stay as they are, so a configuration
    that held plaintext passwords is replaced by hashes without any service, tenant or
    running server noticing; the log says it happened."""
    config = secrets_.server_config
    plaintext = plaintext_users(config)
    update_secret(config, render_server_config(secrets_, paths_root=paths_root).encode(),
                  owner=owner_of(config) if config.exists() else None)
    if plaintext:
        log.warning("migrated %s: it held the plaintext passwords of %d NATS users (an older "
                    "lmforge); now only their bcrypt hashes, credential files unchanged",
                    secrets_.server_config, len(plaintext))


def ensure_nats_secrets(root: Path, *, hosts: Sequence[str] = TLS_HOSTS,
                        paths_root: Path | None = None) -> NatsSecrets:
    """Credentials for every role, the CA and server certificate (each made only if
    missing) and the server configuration (rendered every time)."""
    found = NatsSecrets(secure_dir(root))
    secure_dir(root / "nats")
    for role in ROLES:
        path = found.credential_path(role)
        if not path.exists():
            tenant = DEFAULT_TENANT if role == CLIENT else ""
            new_credential(role, tenant=tenant).save(path)
    ensure_server_tls(secure_dir(found.tls_dir), [*hosts])
    write_server_config(found, paths_root=paths_root)
    return found


def add_tenant_client(secrets_: NatsSecrets, tenant: str, *,
                      paths_root: Path | None = None) -> tuple[Path, bool]:
    """A client credential for `tenant` (kept if there is one) and the server configuration
    rendered again with its permission on `lmforge.dataset.ready.<tenant>`; returns the
    credential's path and whether it is new. A running server applies it on a reload
    (`nats_server.reload`)."""
    if not TENANT_PATTERN.match(tenant):
        raise ValueError(f"tenant {tenant!r} must be 1-63 of a-z, 0-9, '-' and '_', "
                         f"starting with a letter or digit")
    path = secrets_.client_path(tenant)
    created = not path.exists()
    if created:
        new_credential(CLIENT, user=client_user(tenant), tenant=tenant).save(path)
    write_server_config(secrets_, paths_root=paths_root)
    return path, created
