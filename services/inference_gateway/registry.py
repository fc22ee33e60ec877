"""Which model versions are loaded, and which one answers for each name.

A new version is loaded fully before it is swapped in; requests already
running keep the engine they started with.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from services.inference_gateway.engine import GenerationEngine


class UnknownModelError(KeyError):
    pass


@dataclass
class ModelRegistry:
    _current: dict[str, GenerationEngine] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self, name: str, engine: GenerationEngine) -> None:
        """Swap `engine` in for `name`. Requests already running keep the engine they
        started with; the old one is told to retire once they are done."""
        with self._lock:
            old = self._current.get(name)
            self._current[name] = engine
        if old is not None and old is not engine and hasattr(old, "retire"):
            old.retire()

    def get(self, name: str) -> GenerationEngine:
        with self._lock:
            engine = self._current.get(name)
            known = sorted(self._current)
        if engine is None:
            raise UnknownModelError(f"model {name!r} is not served here; serving: {known}")
        return engine

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._current)

    def version(self, name: str) -> str | None:
        with self._lock:
            engine = self._current.get(name)
        return engine.version if engine else None
