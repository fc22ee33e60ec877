"""NATS credentials and the nats-server configuration that enforces them.

`ensure_nats_secrets(<home>/secrets)` is what `lmforge up` runs before starting
the server (and `lmforge secrets DIR` for docker-compose):

  secrets/                     0700
    nats/<role>.json           0600  {"user", "password", "role", "tenant"}: one per
                                     service, `client` and `admin`
    tls/ca.pem, server.pem     the CA services verify the server against, its cert
    tls/*-key.pem              0600
    nats-server.conf           0600  users, their permissions (nats_roles) and TLS

Credentials and certificates already there (an earlier `up`, or the
operator's own) are kept; the server configuration is rendered again on every
call, so a newer build's permissions apply at the next start. Passwords are
256-bit random tokens: nats-server compares them in constant time, and they
never appear on a command line or in the environment (services read their
credential file, named by LMFORGE_NATS_CREDS).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.security.nats_roles import ROLES, inbox_prefix, role_permissions
from lmforge.security.secret_files import secure_dir, write_secret
from lmforge.security.tls_certs import ServerTls, ensure_server_tls

DEFAULT_TENANT = "default"
"""The tenant of the `client` credential `lmforge up` generates."""

TLS_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")


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

    def credentials(self) -> list[NatsCredential]:
        return [NatsCredential.load(p) for p in sorted((self.root / "nats").glob("*.json"))]


def render_server_config(secrets_: NatsSecrets, *, paths_root: Path | None = None) -> str:
    """The nats-server configuration (JSON, which its parser reads): TLS on the client
    port, every credential with its role's permissions. `paths_root`: where the secrets
    directory is mounted for the server (a container), if not where it is here."""
    root = paths_root or secrets_.root
    tls = secrets_.tls
    users = []
    for cred in secrets_.credentials():
        users.append({"user": cred.user, "password": cred.password,
                      "permissions": role_permissions(cred.role).as_config()})
    config = {
        "tls": {"cert_file": str(root / tls.cert.relative_to(secrets_.root)),
                "key_file": str(root / tls.key.relative_to(secrets_.root)),
                "ca_file": str(root / tls.ca.relative_to(secrets_.root)),
                "timeout": 5},
        "authorization": {"users": users},
        "max_payload": 8 << 20,
    }
    return json.dumps(config, indent=1)


def ensure_nats_secrets(root: Path, *, hosts: Sequence[str] = TLS_HOSTS,
                        paths_root: Path | None = None) -> NatsSecrets:
    """Credentials for every role, the CA and server certificate (each made only if
    missing) and the server configuration (rendered every time)."""
    found = NatsSecrets(secure_dir(root))
    secure_dir(root / "nats")
    for role in ROLES:
        path = found.credential_path(role)
        if not path.exists():
            tenant = DEFAULT_TENANT if role == "client" else ""
            new_credential(role, tenant=tenant).save(path)
    ensure_server_tls(secure_dir(found.tls_dir), [*hosts])
    write_secret(found.server_config,
                 render_server_config(found, paths_root=paths_root).encode())
    return found
