"""Bytes one rank needs to train: the ZeRO paper's model for mixed-precision Adam.

16 bytes per parameter — 2 (16-bit weights) + 2 (gradients) + 12 (fp32 master,
Adam m and v); fp32 training keeps 4 + 4 + 8, the same 16 — with ZeRO-1
sharding the 12, ZeRO-2 also the gradients and ZeRO-3 also the weights across
the ranks, and offload moving the optimizer (and with ZeRO-3 the weights) to
host memory. Activations follow Korthikanti et al. (2022): 34·s·b·h bytes per
layer plus 5·a·s²·b for attention's scores, or 2·s·b·h per layer when
checkpointed (plus one layer's worth while it is recomputed); the logits add
s·b·V·(2 + 4 + 4) (16-bit logits, their fp32 copy for the loss and its
gradient). Against the H200 runs (benchmarks/results/train_gpu_h200.json, eager
bf16, seq 2048) this is within 2% for 124M but over by 1.7x (350M) and 2.4x (1B):
SDPA's fused attention does not keep all of the s² scores. It is kept
conservative on purpose: a plan it accepts fits; one it refuses may have fit with
a larger micro-batch, which costs the plan nothing but accumulation steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.presets import ModelPreset

GIB = float(1 << 30)


@dataclass(frozen=True, slots=True, kw_only=True)
class Parallelism:
    """How the job is spread and what it trades for memory; passed through to the plan."""

    engine: str = "plain"
    zero_stage: int = 0
    world_size: int = 1
    gradient_checkpointing: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False

    def describe(self) -> str:
        parts = [f"ZeRO-{self.zero_stage}" if self.engine == "deepspeed" else "DDP"
                 if self.world_size > 1 else "plain"]
        if self.offload_optimizer:
            parts.append("offload optimizer")
        if self.offload_params:
            parts.append("offload params")
        if self.gradient_checkpointing:
            parts.append("act. ckpt")
        return "+".join(parts)


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Bytes one rank needs on its device (host memory for offloaded state is not counted)."""

    parameters_bytes: float
    gradients_bytes: float
    optimizer_bytes: float
    activations_bytes: float

    @property
    def total_bytes(self) -> float:
        return (self.parameters_bytes + self.gradients_bytes + self.optimizer_bytes
                + self.activations_bytes)

    def describe(self, parallelism: Parallelism) -> str:
        return (f"{self.total_bytes / GIB:.2f} GiB per rank — weights "
                f"{self.parameters_bytes / GIB:.2f} + gradients {self.gradients_bytes / GIB:.2f}"
                f" + optimizer {self.optimizer_bytes / GIB:.2f} (16 B/parameter, ZeRO-"
                f"{parallelism.zero_stage} over {parallelism.world_size} rank(s)) + activations "
                f"{self.activations_bytes / GIB:.2f}")


def estimate_memory(parameters: int, preset: ModelPreset, *, micro_batch: int, seq_len: int,
                    vocab_size: int, parallelism: Parallelism,
                    adapters: tuple[int, float] | None = None) -> MemoryEstimate:
    """`adapters`: LoRA's (trainable parameters, bytes per frozen base parameter); the
    gradients (4 B) and optimizer (12 B) are then the adapters' alone (adaptation.py)."""
    n = float(parameters)
    par = parallelism
    shard = max(1, par.world_size)
    weights, grads, optimizer = 2 * n, 2 * n, 12 * n
    if adapters is not None:
        trainable, frozen_bytes = adapters
        weights, grads, optimizer = frozen_bytes * n, 4.0 * trainable, 12.0 * trainable
    if par.zero_stage >= 1:
        optimizer /= shard
    if par.zero_stage >= 2:
        grads /= shard
    if par.zero_stage >= 3:
        weights /= shard
    if par.offload_optimizer:
        optimizer = 0.0
    if par.offload_params:
        weights = 0.0
    s, b, h, layers = seq_len, micro_batch, preset.hidden_size, preset.num_layers
    full_layer = 34 * s * b * h + 5 * preset.num_heads * s * s * b
    if par.gradient_checkpointing:
        activations = 2 * s * b * h * layers + full_layer
    else:
        activations = layers * full_layer
    activations += s * b * vocab_size * (2 + 4 + 4)
    return MemoryEstimate(weights, grads, optimizer, float(activations))
