"""Resource plans: how big a model, how many steps, on what, checkpointed how often.

The plan is arithmetic over the data and the budget, kept free of NATS and of
torch so it can be unit-tested and reasoned about. Throughput is estimated
from the training FLOPs per token (6·N for the weights plus 12·L·H·T for
attention) and the pool's sustained FLOP/s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmforge.failures import BadInput
from lmforge.presets import PRESETS, ModelPreset


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolSpec:
    """What the worker pool offers."""

    name: str = "local"
    device: str = "cpu"
    memory_gib: float = 16.0
    """Memory of one device (GPU memory, or the RAM a CPU worker may use)."""
    sustained_gflops: float = 30.0
    """Training throughput of one worker, in GFLOP/s (2 AVX2 cores in fp32: ~40 measured)."""
    precision: str = "fp32"


@dataclass(frozen=True, slots=True, kw_only=True)
class Parallelism:
    """How the job is spread and what it trades for memory; passed through to the plan."""

    engine: str = "plain"
    zero_stage: int = 0
    world_size: int = 1
    gradient_checkpointing: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanRequest:
    train_tokens: int
    vocab_size: int
    seq_len: int
    time_budget_s: float
    preset: str = "tiny"
    micro_batch: int = 16
    max_epochs: float = 4.0
    seed: int = 1234
    parallelism: Parallelism = Parallelism()


@dataclass(frozen=True, slots=True)
class Plan:
    preset: ModelPreset
    seq_len: int
    micro_batch: int
    grad_accum: int
    max_steps: int
    learning_rate: float
    warmup_steps: int
    checkpoint_interval: int
    precision: str
    device: str
    pool: str
    parameters: int
    estimated_seconds: float
    seed: int
    vocab_size: int
    memory: MemoryEstimate
    parallelism: Parallelism


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Bytes one rank needs, by the ZeRO paper's model for mixed-precision Adam."""

    parameters_bytes: float
    gradients_bytes: float
    optimizer_bytes: float
    activations_bytes: float

    @property
    def total_bytes(self) -> float:
        return (self.parameters_bytes + self.gradients_bytes + self.optimizer_bytes
                + self.activations_bytes)


def estimate_memory(parameters: int, preset: ModelPreset, *, micro_batch: int, seq_len: int,
                    parallelism: Parallelism) -> MemoryEstimate:
    """16 bytes per parameter — 2 (16-bit weights) + 2 (gradients) + 12 (fp32 master,
    Adam m and v) — with ZeRO-1 sharding the 12, ZeRO-2 also the gradients and ZeRO-3
    also the weights across the ranks; activations from Korthikanti et al. (34·s·b·h
    bytes per layer plus 5·a·s²·b for attention), or 2·s·b·h per layer when
    checkpointed."""
    n = float(parameters)
    par = parallelism
    shard = max(1, par.world_size)
    weights, grads, optimizer = 2 * n, 2 * n, 12 * n
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
    if par.gradient_checkpointing:
        activations = 2 * s * b * h * layers
    else:
        activations = layers * (34 * s * b * h + 5 * preset.num_heads * s * s * b)
    return MemoryEstimate(weights, grads, optimizer, float(activations))


class PlanError(BadInput, ValueError):
    """The request cannot be planned; the message gives the numbers."""


def plan_training(request: PlanRequest, pool: PoolSpec) -> Plan:
    if request.preset not in PRESETS:
        raise PlanError(f"unknown model preset {request.preset!r}; known: {sorted(PRESETS)}")
    if request.train_tokens <= request.seq_len:
        raise PlanError(
            f"the dataset has {request.train_tokens} training tokens, fewer than one "
            f"sequence of {request.seq_len}; add data or lower LMFORGE_DATAPREP_SEQ_LEN"
        )
    if request.time_budget_s <= 0:
        raise PlanError(f"time budget {request.time_budget_s}s must be positive")
    preset = PRESETS[request.preset]
    parameters = preset.parameters(request.vocab_size)
    par = request.parallelism
    memory = estimate_memory(parameters, preset, micro_batch=request.micro_batch,
                             seq_len=request.seq_len, parallelism=par)
    gib = 1 << 30
    if memory.total_bytes > pool.memory_gib * gib:
        raise PlanError(
            f"the plan does not fit: {preset.name} ({parameters / 1e6:.1f}M parameters) needs "
            f"{memory.total_bytes / gib:.2f} GiB per rank — weights "
            f"{memory.parameters_bytes / gib:.2f} + gradients {memory.gradients_bytes / gib:.2f}"
            f" + optimizer {memory.optimizer_bytes / gib:.2f} (16 B/parameter, ZeRO-"
            f"{par.zero_stage} over {par.world_size} rank(s)) + activations "
            f"{memory.activations_bytes / gib:.2f} — but a {pool.device} device has "
            f"{pool.memory_gib:.1f} GiB; use more ranks, a higher ZeRO stage, offload, "
            "gradient checkpointing or a smaller micro-batch")
    flops_per_token = preset.flops_per_token(request.vocab_size, request.seq_len)
    tokens_per_s = pool.sustained_gflops * 1e9 * par.world_size / flops_per_token
    tokens_per_step = request.micro_batch * request.seq_len * par.world_size
    steps_in_budget = int(request.time_budget_s * tokens_per_s / tokens_per_step)
    steps_in_data = int(request.max_epochs * request.train_tokens / tokens_per_step)
    max_steps = max(1, min(steps_in_budget, steps_in_data))
    # Checkpoint about every tenth of the run, and at least once a minute's work.
    steps_per_minute = max(1, int(60 * tokens_per_s / tokens_per_step))
    checkpoint_interval = max(1, min(math.ceil(max_steps / 10), steps_per_minute))
    return Plan(
        preset=preset,
        seq_len=request.seq_len,
        micro_batch=request.micro_batch,
        grad_accum=1,
        max_steps=max_steps,
        learning_rate=preset.learning_rate,
        warmup_steps=min(100, max(1, max_steps // 10)),
        checkpoint_interval=checkpoint_interval,
        precision=pool.precision,
        device=pool.device,
        pool=pool.name,
        parameters=parameters,
        estimated_seconds=max_steps * tokens_per_step / tokens_per_s,
        seed=request.seed,
        vocab_size=request.vocab_size,
        memory=memory,
        parallelism=par,
    )
