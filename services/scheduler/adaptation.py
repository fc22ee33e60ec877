"""Planning a run that adapts a base model: its real shape and size, and full fine-tuning
or LoRA.

The plan is sized from the base's own config.json and the parameter count read
from its safetensors headers (lmforge.base_models), not from a preset. The
memory model then differs by adaptation:

- full: every weight trains, so the ZeRO model's 16 bytes per parameter hold;
- LoRA: the base is frozen, held at 4 bytes per parameter (fp32, as the trainer
  loads it), 1 (int8) or 0.5 (int4, QLoRA); gradients (4 B) and Adam's fp32
  master, m and v (12 B) exist only for the adapters' r·(in + out) parameters per
  target projection. Activations are kept whole: backward still runs through
  every layer to reach the adapters.

When the user does not choose, full fine-tuning is planned if some device fits
it, else LoRA, and the plan says why (`Adaptation.reason`).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.base_models import BaseModelInfo
from lmforge.presets import ModelPreset

ADAPTATIONS = ("full", "lora")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_RANK = 8
DEFAULT_DROPOUT = 0.0
"""No adapter dropout unless asked: peft's dropout keeps a dropped copy (and its mask) of
every target projection's input for backward, ~40% of a LoRA step's saved activations
(at 124M: 283 MiB saved with 0.05 against 171 MiB without, where full fine-tuning saves
190 MiB); with 0 the adapters read the input the frozen layer already holds. peft's own
default is 0 too. A run that wants the regularisation asks for it (`--lora-dropout`)."""
FULL_LEARNING_RATE = 1e-4
"""Continued pre-training: well below a from-scratch peak, so the base is not forgotten."""
LORA_LEARNING_RATE = 1e-3
"""LoRA's B starts at zero and only r·(in + out) weights move: it takes a higher rate."""
FROZEN_BYTES = {"": 4.0, "int8": 1.0, "int4": 0.5}
"""Bytes per frozen base parameter by `base_weights`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AdaptationRequest:
    """What the user asked of the adaptation; zero values: the planner decides."""

    base: BaseModelInfo
    kind: str = ""
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_dropout: float | None = None
    lora_targets: tuple[str, ...] = ()
    base_weights: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Adaptation:
    """The adaptation a plan carries to the trainer."""

    base: BaseModelInfo
    kind: str
    rank: int = 0
    alpha: float = 0.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()
    base_weights: str = ""
    trainable_parameters: int = 0
    reason: str = ""
    """Why the planner chose `kind` ("" when the user did)."""

    @property
    def learning_rate(self) -> float:
        return LORA_LEARNING_RATE if self.kind == "lora" else FULL_LEARNING_RATE

    @property
    def frozen_bytes_per_parameter(self) -> float:
        return FROZEN_BYTES[self.base_weights]


class AdaptationError(ValueError):
    """An adaptation request that cannot be met; the planner wraps it in a PlanError."""


def base_preset(base: BaseModelInfo) -> ModelPreset:
    """The base's shape as the planner's preset (its name says where it came from)."""
    return ModelPreset(name=f"base:{base.directory.name}", hidden_size=base.hidden_size,
                       num_layers=base.num_layers, num_heads=base.num_heads,
                       intermediate_size=base.intermediate_size,
                       learning_rate=FULL_LEARNING_RATE)


def lora_parameters(base: BaseModelInfo, rank: int, targets: tuple[str, ...]) -> int:
    """r·(in + out) for every targeted projection of every layer."""
    h, i, d = base.hidden_size, base.intermediate_size, base.head_dim
    q, kv = base.num_heads * d, base.num_kv_heads * d
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    unknown = sorted(set(targets) - set(shapes))
    if unknown:
        raise AdaptationError(f"LoRA targets {unknown} are not projections of a "
                              f"{base.family} model; known: {sorted(shapes)}")
    return base.num_layers * sum(rank * sum(shapes[t]) for t in targets)


def resolve_adaptation(request: AdaptationRequest, kind: str, reason: str = "") -> Adaptation:
    """The request as an Adaptation of `kind`, with the planner's defaults filled in."""
    if kind not in ADAPTATIONS:
        raise AdaptationError(f"adaptation {kind!r} must be one of {ADAPTATIONS}")
    if request.base_weights not in FROZEN_BYTES:
        raise AdaptationError(f"base weights {request.base_weights!r} must be '', 'int8' or "
                              "'int4'")
    if kind == "full":
        if request.base_weights:
            raise AdaptationError(f"base weights {request.base_weights} need LoRA: full "
                                  "fine-tuning updates the base, which cannot stay quantized")
        return Adaptation(base=request.base, kind="full",
                          trainable_parameters=request.base.parameters, reason=reason)
    rank = request.lora_rank or DEFAULT_RANK
    targets = request.lora_targets or LORA_TARGETS
    dropout = DEFAULT_DROPOUT if request.lora_dropout is None else request.lora_dropout
    if rank < 1 or not 0 <= dropout < 1 or request.lora_alpha < 0:
        raise AdaptationError(f"LoRA rank {rank} must be >= 1, dropout {dropout} in [0, 1), "
                              f"alpha {request.lora_alpha} >= 0")
    return Adaptation(base=request.base, kind="lora", rank=rank,
                      alpha=request.lora_alpha or 2.0 * rank, dropout=dropout,
                      targets=tuple(targets), base_weights=request.base_weights,
                      trainable_parameters=lora_parameters(request.base, rank, targets),
                      reason=reason)
