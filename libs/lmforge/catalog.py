"""The catalog of accelerator and instance types the planner prices.

Shipped as data (`catalog.json` beside this module: memory, dense TFLOP/s per
precision, interconnect, on-demand and spot $/device-hour, spot preemption
rate, and a source and date for each figure) and overridable by the user with a
JSON file of the same shape (`LMFORGE_CATALOG`): an entry with a known name
changes only the fields it gives, a new name must give them all. No torch and no
NATS here: the scheduler, the CLI and the benchmarks read the same table.

`local-cpu` is this machine: its memory (0 in the file) is read from the OS and
it computes bf16 only where the CPUs do so natively (AVX512-BF16 or AMX);
emulated bf16 ran 8-10x slower than fp32 on the 2-core AVX2 EPYC here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lmforge.failures import BadInput

SHIPPED_CATALOG = Path(__file__).with_name("catalog.json")
LOCAL_CPU = "local-cpu"
MARKETS = ("on-demand", "spot")
PRECISIONS_BY_PREFERENCE = ("bf16", "fp16", "fp32")
"""A device trains in the first of these it computes natively: bf16 where supported,
else fp16 (with the loss scaler), else fp32."""


class CatalogError(BadInput, ValueError):
    """A catalog file or entry that cannot be used; the message names the file and field."""


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceType:
    """One accelerator type as rented: per-device figures, counts an instance offers."""

    name: str
    accelerator: str
    """What the device is, in words (and the instance it comes in)."""
    device: str
    """torch device kind the trainer runs on: cuda or cpu."""
    memory_gib: float
    """Memory of one device (GPU memory; a CPU instance's RAM)."""
    tflops: dict[str, float]
    """Dense peak TFLOP/s per precision the device computes natively."""
    interconnect: str
    interconnect_gb_per_s: float
    """Device-to-device bandwidth per direction, GB/s (gradient all-reduce, ZeRO gathers)."""
    host_link_gb_per_s: float
    """Device-to-host bandwidth, GB/s (ZeRO offload traffic)."""
    counts: tuple[int, ...]
    """Devices per job an instance (or a set of them on one fabric) offers."""
    on_demand_usd_per_hour: float
    """Per device."""
    spot_usd_per_hour: float | None
    """Per device; None where the provider sells no spot capacity."""
    spot_preemptions_per_hour: float
    """Expected preemptions per hour of one spot instance (its MTBF is the inverse)."""
    efficiency: float
    """Fraction of the dense peak a 1B Llama sustains in eager mode on one device."""
    compile_speedup: float
    """torch.compile's throughput gain over eager."""
    checkpoint_write_gb_per_s: float
    """Where checkpoints are written from this type; the trainer measures the real cost."""
    size_exponent: float = 0.4
    """Efficiency scales as (hidden_size / 2048) ** size_exponent below 2048: small
    matrices fill a GPU less (H200 eager MFU 0.24 / 0.265 / 0.357 at hidden 768 /
    1024 / 2048); 0 for CPUs."""
    sources: dict[str, str] = field(default_factory=dict)
    """Where each figure comes from, and as of when."""

    def price_per_device_hour(self, market: str) -> float | None:
        return self.spot_usd_per_hour if market == "spot" else self.on_demand_usd_per_hour

    def preemptions_per_hour(self, market: str) -> float:
        return self.spot_preemptions_per_hour if market == "spot" else 0.0

    def native_precision(self) -> str:
        """bf16 where supported, else fp16 (with the scaler), else fp32."""
        return next(p for p in PRECISIONS_BY_PREFERENCE if self.tflops.get(p, 0) > 0)


@dataclass(frozen=True, slots=True)
class Catalog:
    types: dict[str, InstanceType]
    origin: str
    """The files it was read from, for the plan's explanation."""

    def select(self, names: list[str] | tuple[str, ...]) -> list[InstanceType]:
        """The named types (all of them when `names` is empty), or a CatalogError naming
        the unknown ones."""
        if not names:
            return list(self.types.values())
        unknown = [n for n in names if n not in self.types]
        if unknown:
            raise CatalogError(f"unknown instance type(s) {unknown}; the catalog "
                               f"({self.origin}) has {sorted(self.types)}")
        return [self.types[n] for n in names]


_REQUIRED = [f.name for f in fields(InstanceType)
             if f.name not in ("name", "size_exponent", "sources")]


def _entry(name: str, data: dict[str, Any], where: str) -> InstanceType:
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise CatalogError(f"{where}: type {name!r} lacks {missing}")
    unknown = set(data) - {f.name for f in fields(InstanceType)}
    if unknown:
        raise CatalogError(f"{where}: type {name!r} has unknown field(s) {sorted(unknown)}")
    try:
        entry = InstanceType(name=name, **{**data, "counts": tuple(data["counts"]),
                                           "tflops": dict(data["tflops"])})
    except TypeError as exc:
        raise CatalogError(f"{where}: type {name!r}: {exc}") from None
    if entry.device not in ("cpu", "cuda"):
        raise CatalogError(f"{where}: type {name!r} device {entry.device!r} is not cpu or cuda")
    if not any(entry.tflops.get(p, 0) > 0 for p in PRECISIONS_BY_PREFERENCE):
        raise CatalogError(f"{where}: type {name!r} has no TFLOP/s for any of "
                           f"{PRECISIONS_BY_PREFERENCE}")
    if not entry.counts or min(entry.counts) < 1:
        raise CatalogError(f"{where}: type {name!r} counts {entry.counts} must be >= 1")
    if entry.spot_preemptions_per_hour < 0 or entry.on_demand_usd_per_hour < 0:
        raise CatalogError(f"{where}: type {name!r} has a negative price or rate")
    return entry


def _read(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CatalogError(f"catalog {path} cannot be read: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("types"), dict):
        raise CatalogError(f"catalog {path} must be an object with a 'types' object")
    return data["types"]


def machine_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the local CPUs compute bf16 natively rather than emulating it."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def _this_machine(entry: InstanceType) -> InstanceType:
    """local-cpu as measured on this machine: its RAM, and bf16 only where native (at
    the fp32 rate: no speed-up is claimed for it)."""
    memory = entry.memory_gib or machine_memory_gib()
    tflops = dict(entry.tflops)
    if cpu_has_native_bf16() and "bf16" not in tflops:
        tflops["bf16"] = tflops["fp32"]
    elif not cpu_has_native_bf16():
        tflops.pop("bf16", None)
    return replace(entry, memory_gib=memory, tflops=tflops)


def load_catalog(override: Path | None = None) -> Catalog:
    """The shipped catalog with `override`'s entries merged over it (field by field)."""
    raw = _read(SHIPPED_CATALOG)
    origin = str(SHIPPED_CATALOG)
    if override is not None:
        for name, data in _read(override).items():
            if not isinstance(data, dict):
                raise CatalogError(f"catalog {override}: type {name!r} must be an object")
            raw[name] = {**raw.get(name, {}), **data}
        origin += f" + {override}"
    types = {name: _entry(name, data, origin) for name, data in raw.items()}
    if LOCAL_CPU in types:
        types[LOCAL_CPU] = _this_machine(types[LOCAL_CPU])
    return Catalog(types, origin)
