"""How a process authenticates to NATS: its credential and the CA it trusts.

Every connection in lmforge (`EventBus`, the supervisor, the CLI) takes its
`nats.connect` options from `NatsAuth.connect_options()`, so there is one way
to connect. Without a credential or CA (a test's open server, an operator's
own unsecured NATS) the options are empty and the connection is plain.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.security.nats_roles import CLIENT
from lmforge.security.nats_secrets import NatsCredential


def refused_credentials(exc: BaseException) -> bool:
    """The server said no to who we are (nats-py raises a plain Error while connecting)."""
    return "authorization violation" in str(exc).lower()


@dataclass(frozen=True)
class NatsAuth:
    credential: NatsCredential | None = None
    ca: Path | None = None
    """PEM bundle the server's certificate must chain to; None: plaintext."""

    @classmethod
    def from_files(cls, creds: Path | None, ca: Path | None) -> NatsAuth:
        """From a credential file and a CA file (LMFORGE_NATS_CREDS / LMFORGE_NATS_CA)."""
        return cls(credential=NatsCredential.load(creds) if creds else None, ca=ca)

    @property
    def secured(self) -> bool:
        return self.credential is not None or self.ca is not None

    @property
    def tenant(self) -> str:
        return self.credential.tenant if self.credential else ""

    @property
    def reads_by_query(self) -> bool:
        """A tenant's client credential: the server lets it read its runs and costs only
        by asking (`contracts.tenant_queries`), never from the stream or the ledger."""
        return self.credential is not None and self.credential.role == CLIENT

    def tls_context(self) -> ssl.SSLContext | None:
        if self.ca is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for `nats.connect`: user, password, inbox prefix, TLS."""
        options: dict[str, Any] = {}
        if self.credential is not None:
            options.update(user=self.credential.user, password=self.credential.password,
                           inbox_prefix=self.credential.inbox_prefix)
        context = self.tls_context()
        if context is not None:
            options["tls"] = context
        return options
