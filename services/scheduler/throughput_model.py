"""Seconds per optimizer step of a candidate plan: compute, communication, offload.

Compute: the step's training FLOPs (6·N + 12·L·H·T per token, ×4/3 when
activations are recomputed) over the devices' sustained FLOP/s, which is the
dense peak for the precision × the type's efficiency (a 1B Llama in eager mode)
× the size law (hidden_size / 2048) ** size_exponent × torch.compile's speed-up ×
0.8 under ZeRO-3 (its gathers cost 17-26% on one H200: train_gpu_h200.json). A
measured calibration replaces the catalog's efficiency (carried to other sizes
by the same law).

Communication, with several devices: a ring all-reduce of the 16-bit gradients
moves 2·(n-1)/n·2N bytes per device per step; ZeRO-3 also gathers the weights
for forward and backward of every micro-batch (the ZeRO paper's 1.5x).
Offload: the gradients go down and the weights come back over the host link
every step, and the CPU Adam updates N/n parameters per rank at
CPU_ADAM_PARAMS_PER_S; offloaded weights (ZeRO-3) come up for forward and
backward of every micro-batch. Nothing is assumed to overlap with compute:
the estimate errs slow, never fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.calibration import Calibration
from lmforge.catalog import InstanceType
from lmforge.presets import ModelPreset
from services.scheduler.memory_model import Parallelism

REFERENCE_HIDDEN = 2048
"""The catalog's efficiency is for a 1B Llama (hidden 2048)."""
ZERO3_FACTOR = 0.8
"""ZeRO-3's throughput on one device relative to eager (H200: 0.83 at 1B, 0.74 at 350M)."""
RECOMPUTE_FACTOR = 4 / 3
"""Activation checkpointing runs the forward twice: 8 of the 6 units of work per token."""
CPU_ADAM_PARAMS_PER_S = 1e9
"""DeepSpeed's CPU Adam on a many-core host, assumed (not measured here)."""


@dataclass(frozen=True, slots=True)
class StepTime:
    compute_s: float
    communication_s: float
    offload_s: float
    flops_per_device: float
    """Sustained training FLOP/s of one device the compute time assumes."""
    source: str
    """"catalog" or "calibrated": where the efficiency came from."""

    @property
    def total_s(self) -> float:
        return self.compute_s + self.communication_s + self.offload_s


def size_factor(instance: InstanceType, hidden_size: int) -> float:
    return min(1.0, hidden_size / REFERENCE_HIDDEN) ** instance.size_exponent


def sustained_flops(instance: InstanceType, precision: str, preset: ModelPreset, *,
                    compiled: bool, zero_stage: int,
                    calibration: Calibration | None = None) -> tuple[float, str]:
    """FLOP/s one device sustains on `preset`, and whether the catalog or a measurement
    says so."""
    peak = instance.tflops[precision] * 1e12
    efficiency, source = instance.efficiency, "catalog"
    if calibration is not None and calibration.flops_per_device > 0:
        measured = calibration.flops_per_device / peak
        measured /= size_factor(instance, calibration.hidden_size)
        if calibration.compiled:
            measured /= instance.compile_speedup
        if calibration.zero_stage >= 3:
            measured /= ZERO3_FACTOR
        efficiency, source = measured, "calibrated"
    flops = peak * efficiency * size_factor(instance, preset.hidden_size)
    if compiled:
        flops *= instance.compile_speedup
    if zero_stage >= 3:
        flops *= ZERO3_FACTOR
    return flops, source


def step_time(instance: InstanceType, preset: ModelPreset, *, parameters: int,
              vocab_size: int, seq_len: int, micro_batch: int, grad_accum: int,
              precision: str, compiled: bool, parallelism: Parallelism,
              calibration: Calibration | None = None) -> StepTime:
    n = parallelism.world_size
    tokens = micro_batch * grad_accum * n * seq_len
    flops = tokens * preset.flops_per_token(vocab_size, seq_len)
    if parallelism.gradient_checkpointing:
        flops *= RECOMPUTE_FACTOR
    per_device, source = sustained_flops(instance, precision, preset, compiled=compiled,
                                         zero_stage=parallelism.zero_stage,
                                         calibration=calibration)
    compute = flops / (n * per_device)
    element = 4 if precision == "fp32" else 2
    weights_bytes = element * float(parameters)
    communication = 0.0
    if n > 1:
        ring = 2 * (n - 1) / n
        volume = ring * weights_bytes
        if parallelism.zero_stage >= 3:
            volume += grad_accum * ring * weights_bytes
        communication = volume / (instance.interconnect_gb_per_s * 1e9)
    offload = 0.0
    host = instance.host_link_gb_per_s * 1e9
    if parallelism.offload_optimizer:
        offload += 2 * weights_bytes / n / host + parameters / n / CPU_ADAM_PARAMS_PER_S
    if parallelism.offload_params:
        offload += grad_accum * 2 * weights_bytes / host
    return StepTime(compute, communication, offload, per_device, source)
