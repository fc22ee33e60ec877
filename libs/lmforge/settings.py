"""Typed settings from the environment, validated once at start-up.

Every service has a `Settings` subclass of `ServiceSettings` with its own
prefix (`LMFORGE_TRAINER_…`); the shared fields use `LMFORGE_…`. A bad value
stops the process with one clear line (see `load_settings`), never a traceback
ten minutes later.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from lmforge.failures import BadInput

if TYPE_CHECKING:
    from lmforge.artifacts import ArtifactStore
    from lmforge.security.nats_connect import NatsAuth

DEFAULT_HOME = Path(".lmforge")


class TenantWithoutRoots(BadInput):
    """A run's tenant has no data roots of its own while per-tenant roots are configured."""


def _resolved(roots: list[str]) -> list[str]:
    return [str(root) if "://" in str(root) else str(Path(root).expanduser().resolve())
            for root in roots]


class PlatformSettings(BaseSettings):
    """Settings every lmforge process shares (env prefix `LMFORGE_`)."""

    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", frozen=True)

    nats_url: str = Field(
        "nats://127.0.0.1:4222", description="NATS server URL(s), comma separated."
    )
    nats_creds: Path | None = Field(
        None, description="This process's NATS credential (JSON: user, password, role, "
        "tenant; mode 0600). `lmforge up` generates one per service under "
        "$LMFORGE_HOME/secrets/nats and sets it. Unset: connect without one.")
    nats_ca: Path | None = Field(
        None, description="CA certificate (PEM) the NATS server's TLS certificate must chain "
        "to; set: the connection is TLS and the server verified. Unset: plaintext.")
    home: Path = Field(
        DEFAULT_HOME,
        description="State directory: artifacts, checkpoints, logs, the embedded NATS store.",
    )
    data_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [str(Path.cwd())],
        description="Where datasets may be read from: directories and object-store prefixes "
        "(s3://bucket/prefix/), os.pathsep or comma separated.",
    )
    tenant_data_roots: Annotated[dict[str, list[str]], NoDecode] = Field(
        default_factory=dict,
        description="Data roots per tenant: `acme=/data/acme,globex=/data/globex:s3://g/` "
        "(a `tenant=` starts a tenant's list; the roots after it, comma or os.pathsep "
        "separated, are its). Set: a run reads only its tenant's roots (the tenant NATS "
        "vouched for), and a tenant not listed is refused; an untenanted run (open NATS) "
        "reads LMFORGE_DATA_ROOTS. Empty: every run reads LMFORGE_DATA_ROOTS.")
    model_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Where base models (local Hugging Face directories) may be read from, "
        "os.pathsep or comma separated; empty: the data roots.")
    base_model_allow_pickle: bool = Field(
        False, description="Accept base models stored as pickle (.bin) checkpoints; off: "
        "safetensors only (unpickling runs code the file carries).")
    log_level: str = Field("INFO", description="Python logging level.")
    stream_replicas: int = Field(
        1, ge=1, le=5, description="JetStream replicas of every stream and key-value bucket: "
        "1 on one nats-server, 3 on a three-node cluster (deploy/k8s).")
    artifact_url: str = Field(
        "", description="Object-store URL (s3://bucket/prefix, or any fsspec URL) that every "
        "artifact is also uploaded to and fetched from when missing locally: checkpoints a "
        "trainer on another machine resumes from. Empty: local disk only.")
    artifact_s3_endpoint_url: str = Field(
        "", description="S3-protocol endpoint for artifact_url (MinIO, a test server); empty: "
        "AWS_ENDPOINT_URL.")
    catalog: Path | None = Field(
        None, description="A JSON file of instance types merged over the shipped catalog "
        "(libs/lmforge/catalog.json): the planner's prices, memory and TFLOP/s.")

    @field_validator("data_roots", "model_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            # os.pathsep separates roots, but not the "//" of a URL: s3://b/p stays whole.
            parts = re.split(rf",|{re.escape(os.pathsep)}(?!//)", value)
            return [p.strip() for p in parts if p.strip()]
        if isinstance(value, list | tuple):
            return [os.fspath(v) for v in value]
        return value

    @field_validator("data_roots")
    @classmethod
    def _resolve_roots(cls, roots: list[str]) -> list[str]:
        if not roots:
            raise ValueError("at least one data root is required")
        return _resolved(roots)

    @field_validator("tenant_data_roots", mode="before")
    @classmethod
    def _split_tenant_roots(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        from lmforge.contracts.subjects import TENANT_PATTERN

        found: dict[str, list[str]] = {}
        tenant = ""
        for part in re.split(rf",|{re.escape(os.pathsep)}(?!//)", value):
            part = part.strip()
            head, eq, root = part.partition("=")
            if eq and TENANT_PATTERN.match(head):
                tenant, part = head, root.strip()
                if tenant in found:
                    raise ValueError(f"tenant {tenant!r} is listed twice")
                found[tenant] = []
            elif eq:
                raise ValueError(f"{head!r} is not a tenant name (1-63 of a-z, 0-9, '-', '_')")
            if not tenant:
                raise ValueError(f"root {part!r} comes before any `tenant=`; write "
                                 f"`acme=/data/acme,globex=/data/globex`")
            if part:
                found[tenant].append(part)
        empty = [t for t, roots in found.items() if not roots]
        if empty:
            raise ValueError(f"tenant(s) {empty} have no data roots")
        return found

    @field_validator("tenant_data_roots")
    @classmethod
    def _resolve_tenant_roots(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        return {tenant: _resolved(roots) for tenant, roots in value.items()}

    def data_roots_for(self, tenant: str) -> list[str]:
        """Where a run of `tenant` may read data: its own roots when LMFORGE_TENANT_DATA_ROOTS
        is set (raises TenantWithoutRoots for a tenant it does not list, never another's
        roots or the shared ones), else LMFORGE_DATA_ROOTS."""
        if not self.tenant_data_roots or not tenant:
            return self.data_roots
        if tenant not in self.tenant_data_roots:
            raise TenantWithoutRoots(
                f"tenant {tenant!r} has no data roots: LMFORGE_TENANT_DATA_ROOTS lists "
                f"{', '.join(sorted(self.tenant_data_roots))}; add {tenant}=/path/to/its/data")
        return self.tenant_data_roots[tenant]

    @field_validator("nats_creds", "nats_ca")
    @classmethod
    def _readable_file(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"{path} is not a readable file")
        return path

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, level: str) -> str:
        level = level.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"log level {level!r} is not one of DEBUG, INFO, WARNING, ERROR")
        return level

    def base_model_roots(self, tenant: str = "") -> list[Path]:
        """Where base models may be read from (LMFORGE_MODEL_ROOTS, else the data roots of
        `tenant`'s runs)."""
        from lmforge.base_models import model_roots

        return model_roots(self.model_roots, self.data_roots_for(tenant))

    def nats_auth(self) -> NatsAuth:
        """How to authenticate to NATS: LMFORGE_NATS_CREDS and LMFORGE_NATS_CA."""
        from lmforge.security.nats_connect import NatsAuth

        return NatsAuth.from_files(self.nats_creds, self.nats_ca)

    @property
    def artifacts_dir(self) -> Path:
        return self.home.resolve() / "artifacts"

    def artifact_store(self) -> ArtifactStore:
        """The artifact store: LMFORGE_HOME/artifacts, plus the remote tier if configured."""
        from lmforge.artifacts import ArtifactStore
        from lmforge.object_store import remote_artifacts

        return ArtifactStore(self.artifacts_dir, remote=remote_artifacts(
            self.artifact_url, self.artifact_s3_endpoint_url))


class ServiceSettings(PlatformSettings):
    """What a bus-connected service needs on top of the platform settings."""

    metrics_port: int = Field(
        0, ge=0, le=65535, description="Prometheus /metrics port; 0 picks a free one."
    )
    ack_wait_s: float = Field(
        30.0, gt=0, allow_inf_nan=False,
        description="Seconds before an unacknowledged event is redelivered."
    )
    max_deliver: int = Field(
        5, ge=1, description="Deliveries of one event before it is dead-lettered."
    )
    replica: int = Field(0, ge=0, description="Replica index given by the supervisor.")


S = TypeVar("S", bound=BaseSettings)


def describe_errors(error: ValidationError, settings_type: type[BaseSettings]) -> str:
    """One line per bad field, naming the environment variable and the value."""
    prefix = settings_type.model_config.get("env_prefix", "")
    lines = []
    for err in error.errors():
        field = ".".join(str(p) for p in err["loc"])
        var = f"{prefix}{field}".upper()
        got = os.environ.get(var, err.get("input"))
        lines.append(f"{var}={got!r}: {err['msg']}")
    return "; ".join(lines)


def load_settings(settings_type: type[S]) -> S:
    """Build settings from the environment or exit(2) with one clear line."""
    try:
        return settings_type()
    except ValidationError as error:
        print(f"invalid settings: {describe_errors(error, settings_type)}", file=sys.stderr)
        raise SystemExit(2) from None
