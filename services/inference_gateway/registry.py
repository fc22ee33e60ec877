"""Which model versions are loaded, and which one answers for each name.

A new version is loaded fully before it is installed; from then on it answers
requests that name no version, while the previous `keep - 1` versions stay
loaded for requests that ask for them by version (KServe's model_version).
Requests already running keep the engine they started with; an engine pushed
out of the kept versions is told to retire once they are done.

A model that is deployed (the deployments bucket says so) but not loaded here
yet is *pending*: a replica restoring its models, loading a new version or
retrying a failed load answers it with `ModelLoading` (UNAVAILABLE, retry),
never `UnknownModel` — another replica, or this one in a moment, serves it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Gauge

from services.inference_gateway.access import caller_tenant, visible_to
from services.inference_gateway.engines.base import Engine
from services.inference_gateway.errors import GatewayError, ModelLoading, UnknownModel

MODEL_PRECISION = Gauge("lmforge_gateway_model_precision",
                        "1 per loaded model version and the precision it is served at.",
                        ["model", "version", "precision"])


@dataclass(slots=True)
class PendingModel:
    """A deployed version this replica has not loaded yet, and how its loading goes."""

    version: str
    since: float = field(default_factory=time.monotonic)
    attempts: int = 0
    """Failed loads so far."""
    last_error: str = ""
    retry_at: float = 0.0
    """time.monotonic() of the next attempt (0: now)."""

    def describe(self) -> str:
        if not self.attempts:
            return f"version {self.version} is loading"
        wait = max(0.0, self.retry_at - time.monotonic())
        return (f"version {self.version} failed to load {self.attempts} time(s) "
                f"({self.last_error}); next attempt in {wait:.0f} s")


@dataclass
class ModelRegistry:
    keep: int = 2
    """Versions kept loaded per model (the current one included)."""
    _versions: dict[str, dict[str, Engine]] = field(default_factory=dict)
    _current: dict[str, str] = field(default_factory=dict)
    _pending: dict[str, PendingModel] = field(default_factory=dict)
    _installs: int = 0
    _installed_at: dict[str, int] = field(default_factory=dict)
    _precision: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    _task_eval: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _tenants: dict[str, str] = field(default_factory=dict)
    """model name -> the tenant that owns it ('' or absent: everyone's)."""

    def assign_tenant(self, name: str, tenant: str) -> None:
        """`name` belongs to `tenant`: other tenants' keys get NOT_FOUND for it."""
        with self._lock:
            self._tenants[name] = tenant

    def tenant_of(self, name: str) -> str:
        with self._lock:
            return self._tenants.get(name, "")

    def _visible(self, name: str) -> bool:
        return visible_to(self._tenants.get(name, ""), caller_tenant.get())

    def install(self, name: str, engine: Engine) -> None:
        """Make `engine` (whose `.version` names it) the current version of `name`."""
        with self._lock:
            evicted = self._install_locked(name, engine)
        for old in evicted:
            old.retire()

    def install_expected(self, name: str, engine: Engine) -> bool:
        """Install `engine` if its version is still the one `name` is expected at; False
        (nothing installed) when a newer deployment replaced that expectation while it
        loaded: a restore that finishes after a newer `model.exported` does not take the
        model back to the version the bucket held when the restore read it."""
        with self._lock:
            pending = self._pending.get(name)
            if pending is None or pending.version != engine.version:
                return False
            evicted = self._install_locked(name, engine)
        for old in evicted:
            old.retire()
        return True

    def _install_locked(self, name: str, engine: Engine) -> list[Engine]:
        """Install under the lock; returns the engines pushed out (to retire after it)."""
        versions = self._versions.setdefault(name, {})
        replaced = versions.pop(engine.version, None)
        versions[engine.version] = engine  # insertion order = age
        self._current[name] = engine.version
        self._installs += 1
        self._installed_at[name] = self._installs
        if (pending := self._pending.get(name)) is not None and \
                pending.version == engine.version:
            del self._pending[name]
        evicted = [replaced] if replaced is not None and replaced is not engine else []
        while len(versions) > self.keep:
            oldest = next(iter(versions))
            evicted.append(versions.pop(oldest))
        return evicted

    def get(self, name: str, version: str = "") -> Engine:
        with self._lock:
            engine = (self._versions.get(name, {}).get(version or self._current.get(name, ""))
                      if self._visible(name) else None)
        if engine is None:
            raise self.missing(name, version)
        return engine

    def missing(self, name: str, version: str = "") -> GatewayError:
        """Why `name` (at `version`, "" = current) cannot be served here: still loading
        (ModelLoading), or not deployed (UnknownModel)."""
        with self._lock:
            visible = self._visible(name)
            pending = self._pending.get(name) if visible else None
            known = sorted(n for n in self._current if self._visible(n))
            loaded = list(self._versions.get(name, {})) if visible else []
        if pending is not None and version in ("", pending.version):
            return ModelLoading(f"model {name!r} is deployed but not loaded on this replica "
                                f"yet: {pending.describe()}; retry shortly")
        if loaded and version:
            return UnknownModel(f"model {name!r} has no version {version!r} loaded; "
                                f"loaded: {loaded}")
        return UnknownModel(f"model {name!r} is not served here; serving: {known}")

    # -- deployed, not loaded yet ------------------------------------------------------

    def expect(self, name: str, version: str) -> PendingModel | None:
        """Record that `version` of `name` is deployed and about to be loaded here (unless
        it is loaded already); returns its pending state, or None when it is loaded."""
        with self._lock:
            if version in self._versions.get(name, {}):
                return None
            pending = self._pending.get(name)
            if pending is None or pending.version != version:
                pending = self._pending[name] = PendingModel(version)
            return pending

    def forget(self, name: str, version: str) -> None:
        """`version` of `name` is not deployed after all (its only load failed)."""
        with self._lock:
            pending = self._pending.get(name)
            if pending is not None and pending.version == version:
                del self._pending[name]

    def pending(self) -> dict[str, PendingModel]:
        """Deployed models not loaded here yet, by name."""
        with self._lock:
            return dict(self._pending)

    @property
    def installs(self) -> int:
        """How many installs so far: a mark to compare `installed_since` with."""
        with self._lock:
            return self._installs

    def installed_since(self, name: str, mark: int) -> bool:
        """Whether a version of `name` was installed after `installs` read `mark`."""
        with self._lock:
            return self._installed_at.get(name, 0) > mark

    def loaded(self, name: str, version: str) -> bool:
        with self._lock:
            return version in self._versions.get(name, {})

    def close(self) -> None:
        """Shut every engine down now (the gateway is stopping): nothing restarts them."""
        with self._lock:
            engines = [e for versions in self._versions.values() for e in versions.values()]
            self._versions.clear()
            self._current.clear()
            self._pending.clear()
        for engine in engines:
            engine.close()

    def record_precision(self, name: str, version: str, precision: str, reason: str) -> None:
        """What `version` of `name` computes with ("int4-awq-g128", "fp32") and why it is
        not the exported precision ("" when it is); said by /v1/models and metrics."""
        with self._lock:
            self._precision[(name, version)] = (precision, reason)
        MODEL_PRECISION.labels(name, version, precision).set(1)

    def precision(self, name: str, version: str = "") -> tuple[str, str]:
        """(precision, reason) of `version` (default: the current one) of `name`;
        ("", "") when not recorded (a remote model)."""
        with self._lock:
            key = (name, version or self._current.get(name, ""))
            return self._precision.get(key, ("", ""))

    def record_task_eval(self, name: str, version: str, figures: dict[str, Any]) -> None:
        """The eval set's figures of `version` of `name` as the export carries them
        (task_eval.served_figures); said by /v1/models."""
        with self._lock:
            self._task_eval[(name, version)] = figures

    def task_eval(self, name: str, version: str = "") -> dict[str, Any]:
        """The eval figures of `version` (default: the current one) of `name`; {} when
        none were measured or recorded (a remote model)."""
        with self._lock:
            return self._task_eval.get((name, version or self._current.get(name, "")), {})

    def names(self) -> list[str]:
        """The models served, those of the calling tenant (all outside a request)."""
        with self._lock:
            return sorted(n for n in self._current if self._visible(n))

    def version(self, name: str) -> str | None:
        """The current version of `name`, or None."""
        with self._lock:
            return self._current.get(name) if self._visible(name) else None

    def versions(self, name: str) -> list[str]:
        """Loaded versions of `name`, newest first."""
        with self._lock:
            return list(reversed(self._versions.get(name, {}))) if self._visible(name) else []
