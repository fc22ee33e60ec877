"""GPU utilisation, memory and power on the trainer's /metrics, read from NVML at scrape time.

NVML (nvidia-ml-py, imported as `pynvml`) is what nvidia-smi and DCGM read; asking
it on each scrape costs microseconds and needs no polling thread. Nothing is made
up when it cannot answer: without the library, or without a driver or GPU, the
trainer logs one line saying which, and `lmforge_gpu_metrics_available` is 0 with
the reason as a label, so a dashboard shows "no GPU metrics" rather than zero
utilisation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import ModuleType

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

log = logging.getLogger("lmforge.trainer.gpu")


class NvmlCollector(Collector):
    """Per-GPU gauges from an initialised pynvml module."""

    def __init__(self, nvml: ModuleType) -> None:
        self.nvml = nvml

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nvml = self.nvml
        util = GaugeMetricFamily("lmforge_gpu_utilization_ratio",
                                 "Fraction of the last sample period a kernel ran (NVML).",
                                 labels=["gpu", "name"])
        used = GaugeMetricFamily("lmforge_gpu_memory_used_bytes", "Device memory in use.",
                                 labels=["gpu", "name"])
        total = GaugeMetricFamily("lmforge_gpu_memory_total_bytes", "Device memory.",
                                  labels=["gpu", "name"])
        power = GaugeMetricFamily("lmforge_gpu_power_watts", "Board power draw.",
                                  labels=["gpu", "name"])
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            labels = [str(index), name.decode() if isinstance(name, bytes) else str(name)]
            util.add_metric(labels, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            used.add_metric(labels, float(memory.used))
            total.add_metric(labels, float(memory.total))
            power.add_metric(labels, nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
        yield from (util, used, total, power)


class UnavailableCollector(Collector):
    """Says, on every scrape, that there are no GPU metrics and why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("lmforge_gpu_metrics_available",
                                   "1 when NVML answers; 0 with the reason otherwise.",
                                   labels=["reason"])
        family.add_metric([self.reason], 0.0)
        yield family


def nvml_collector() -> Collector:
    """The collector this machine supports, the reason logged when it is not NVML."""
    try:
        import pynvml
    except ImportError:
        reason = "nvidia-ml-py not installed"
        log.warning("GPU metrics off: %s (pip install nvidia-ml-py)", reason)
        return UnavailableCollector(reason)
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as exc:
        reason = f"NVML unavailable: {exc}"
        log.info("GPU metrics off: %s (no NVIDIA driver or GPU here)", reason)
        return UnavailableCollector(reason)
    if count == 0:
        log.info("GPU metrics off: NVML sees no GPU")
        return UnavailableCollector("no GPU")
    log.info("GPU metrics on: %d GPU(s) through NVML", count)
    return NvmlCollector(pynvml)


_registered: Collector | None = None


def register_gpu_metrics() -> Collector:
    """Add the GPU collector to the default registry once per process."""
    global _registered
    if _registered is None:
        _registered = nvml_collector()
        REGISTRY.register(_registered)
    return _registered
