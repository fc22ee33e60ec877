"""Which model versions are loaded, and which one answers for each name.

A new version is loaded fully before it is installed; from then on it answers
requests that name no version, while the previous `keep - 1` versions stay
loaded for requests that ask for them by version (KServe's model_version).
Requests already running keep the engine they started with; an engine pushed
out of the kept versions is told to retire once they are done.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from services.inference_gateway.engines.base import Engine
from services.inference_gateway.errors import UnknownModel


@dataclass
class ModelRegistry:
    keep: int = 2
    """Versions kept loaded per model (the current one included)."""
    _versions: dict[str, dict[str, Engine]] = field(default_factory=dict)
    _current: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self, name: str, engine: Engine) -> None:
        """Make `engine` (whose `.version` names it) the current version of `name`."""
        with self._lock:
            versions = self._versions.setdefault(name, {})
            replaced = versions.pop(engine.version, None)
            versions[engine.version] = engine  # insertion order = age
            self._current[name] = engine.version
            evicted = [replaced] if replaced is not None and replaced is not engine else []
            while len(versions) > self.keep:
                oldest = next(iter(versions))
                evicted.append(versions.pop(oldest))
        for old in evicted:
            old.retire()

    def get(self, name: str, version: str = "") -> Engine:
        with self._lock:
            versions = self._versions.get(name, {})
            engine = versions.get(version or self._current.get(name, ""))
            known = sorted(self._current)
            loaded = list(versions)
        if engine is None:
            if versions and version:
                raise UnknownModel(f"model {name!r} has no version {version!r} loaded; "
                                   f"loaded: {loaded}")
            raise UnknownModel(f"model {name!r} is not served here; serving: {known}")
        return engine

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._current)

    def version(self, name: str) -> str | None:
        """The current version of `name`, or None."""
        with self._lock:
            return self._current.get(name)

    def versions(self, name: str) -> list[str]:
        """Loaded versions of `name`, newest first."""
        with self._lock:
            return list(reversed(self._versions.get(name, {})))
