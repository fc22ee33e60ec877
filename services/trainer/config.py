"""The trainer's typed configuration: one small dataclass per component.

The scheduler's `ResourcePlan` fills it (`TrainConfig.from_plan`); every field
is documented and checked in `__post_init__`, so a bad plan is refused before
a model is built, with the field, the value and the rule.

Tests and benchmarks start from a named preset instead
(`TrainConfig.from_preset("small", max_steps=30)`), so they build the same
config, with the same defaults, as the service does from a plan; and
`plan_fields()` turns a config back into a plan's fields for a test or a
benchmark that drives the service over the bus.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lmforge.failures import BadInput
from lmforge.presets import PRESETS

FAMILIES = ("llama", "qwen2")
PRECISIONS = ("fp32", "bf16", "fp16")
ENGINES = ("plain", "deepspeed")
ADAPTATIONS = ("full", "lora")
BASE_WEIGHTS = ("", "int8", "int4")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every attention and MLP projection of the Llama and Qwen2 layouts."""


class ConfigError(BadInput, ValueError):
    """A training config that cannot run; the message names the field."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(kw_only=True, slots=True)
class ModelSpec:
    family: str = "llama"
    """Architecture family built from config: llama or qwen2."""
    hidden_size: int = 128
    """Width of the residual stream."""
    num_layers: int = 4
    """Decoder blocks."""
    num_heads: int = 4
    """Attention heads (key/value heads equal, no GQA at these sizes)."""
    intermediate_size: int = 352
    """Width of the SwiGLU MLP."""
    pretrained_dir: Path | None = None
    """A local Hugging Face directory to fine-tune from instead of building from config."""

    def __post_init__(self) -> None:
        _check(self.family in FAMILIES, f"model.family {self.family!r} not in {FAMILIES}")
        _check(self.hidden_size > 0 and self.num_layers > 0 and self.num_heads > 0,
               "model sizes must be positive")
        _check(self.hidden_size % self.num_heads == 0,
               f"model.hidden_size {self.hidden_size} is not divisible by "
               f"model.num_heads {self.num_heads}")
        if self.pretrained_dir is not None:
            _check(Path(self.pretrained_dir, "config.json").is_file(),
                   f"model.pretrained_dir {self.pretrained_dir} has no config.json")


@dataclass(kw_only=True, slots=True)
class BatchConfig:
    seq_len: int = 128
    """Tokens per sequence (packed: no padding)."""
    micro_batch: int = 16
    """Sequences per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated before each optimizer step."""

    def __post_init__(self) -> None:
        _check(self.seq_len >= 2, f"batch.seq_len {self.seq_len} must be >= 2")
        _check(self.micro_batch >= 1, f"batch.micro_batch {self.micro_batch} must be >= 1")
        _check(self.grad_accum >= 1, f"batch.grad_accum {self.grad_accum} must be >= 1")


@dataclass(kw_only=True, slots=True)
class OptimizerConfig:
    learning_rate: float = 3e-3
    """Peak learning rate, reached after warm-up."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Applied to matrices only, never to norms and biases."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""

    def __post_init__(self) -> None:
        _check(self.learning_rate > 0, f"optimizer.learning_rate {self.learning_rate} must be > 0")
        _check(all(0 <= b < 1 for b in self.betas), f"optimizer.betas {self.betas} not in [0,1)")
        _check(self.weight_decay >= 0 and self.grad_clip >= 0,
               "optimizer.weight_decay and grad_clip must be >= 0")


@dataclass(kw_only=True, slots=True)
class ScheduleConfig:
    max_steps: int = 100
    """Optimizer steps in the whole run."""
    warmup_steps: int = 10
    """Linear warm-up from ~0 to the peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak."""
    time_budget_s: float = 0.0
    """Wall seconds of this attempt (calibration included) after which the trainer
    checkpoints, stops and reports the steps it reached; 0 = no budget."""

    def __post_init__(self) -> None:
        _check(self.max_steps >= 1, f"schedule.max_steps {self.max_steps} must be >= 1")
        _check(self.warmup_steps >= 0, "schedule.warmup_steps must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio must be in [0, 1]")
        _check(self.time_budget_s >= 0,
               f"schedule.time_budget_s {self.time_budget_s} must be >= 0")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    interval: int = 50
    """Checkpoint every this many optimizer steps (and always on SIGTERM)."""
    keep: int = 3
    """Checkpoints kept per run; older ones are deleted."""
    preemptions_per_hour: float = 0.0
    """The plan's preemption rate: when > 0, each checkpoint's measured cost re-plans the
    interval by Young/Daly, √(2 · cost · MTBF); 0 = keep `interval`."""

    def __post_init__(self) -> None:
        _check(self.interval >= 1, f"checkpoint.interval {self.interval} must be >= 1")
        _check(self.keep >= 1, f"checkpoint.keep {self.keep} must be >= 1")
        _check(self.preemptions_per_hour >= 0,
               f"checkpoint.preemptions_per_hour {self.preemptions_per_hour} must be >= 0")


@dataclass(kw_only=True, slots=True)
class EngineConfig:
    kind: str = "plain"
    """plain (PyTorch) or deepspeed."""
    precision: str = "fp32"
    """fp32; bf16 autocast (fp32 master weights); fp16 autocast with a GradScaler."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (deepspeed engine only)."""
    offload_optimizer: bool = False
    """ZeRO: keep optimizer state in CPU memory."""
    offload_params: bool = False
    """ZeRO-3: keep parameters in CPU memory."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% more compute."""
    compile: bool = False
    """torch.compile the model (both engines)."""

    def __post_init__(self) -> None:
        _check(self.kind in ENGINES, f"engine.kind {self.kind!r} not in {ENGINES}")
        _check(self.precision in PRECISIONS,
               f"engine.precision {self.precision!r} not in {PRECISIONS}")
        _check(0 <= self.zero_stage <= 3, f"engine.zero_stage {self.zero_stage} not in 0..3")
        _check(self.kind == "deepspeed" or (self.zero_stage == 0 and not self.offload_optimizer
                                            and not self.offload_params),
               "ZeRO stages and offload need engine.kind='deepspeed'")
        _check(not self.offload_params or self.zero_stage == 3,
               "engine.offload_params needs zero_stage 3")


@dataclass(kw_only=True, slots=True)
class AdapterConfig:
    """How a base model is adapted: every weight (full), or low-rank adapters (LoRA)."""

    kind: str = "full"
    """full: every weight trains (continued pre-training, or from scratch); lora: the base
    is frozen and peft's LoRA adapters train."""
    rank: int = 8
    """LoRA rank r of each adapter pair (A: r x in, B: out x r)."""
    alpha: float = 16.0
    """LoRA scaling numerator: the update is (alpha / rank) * B A."""
    dropout: float = 0.0
    """Dropout on the adapters' input. Off by default, as in the planner (its
    DEFAULT_DROPOUT says why): above 0, peft keeps a dropped copy of each target's input
    for backward, which costs LoRA more activation memory than full fine-tuning keeps."""
    targets: tuple[str, ...] = LORA_TARGETS
    """Module names (suffixes) that get adapters."""
    base_weights: str = ""
    """LoRA: hold the frozen base in int8 or int4 (QLoRA, bitsandbytes on CUDA only);
    "": in the training precision's master dtype (fp32)."""

    def __post_init__(self) -> None:
        _check(self.kind in ADAPTATIONS, f"adapter.kind {self.kind!r} not in {ADAPTATIONS}")
        _check(self.rank >= 1, f"adapter.rank {self.rank} must be >= 1")
        _check(self.alpha > 0, f"adapter.alpha {self.alpha} must be > 0")
        _check(0 <= self.dropout < 1, f"adapter.dropout {self.dropout} not in [0, 1)")
        _check(bool(self.targets), "adapter.targets must name at least one module")
        _check(self.base_weights in BASE_WEIGHTS,
               f"adapter.base_weights {self.base_weights!r} not in {BASE_WEIGHTS}")
        _check(not self.base_weights or self.kind == "lora",
               f"adapter.base_weights={self.base_weights!r} needs adapter.kind='lora' (full "
               "fine-tuning updates the base weights, which cannot stay quantized)")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    seed: int = 1234
    """Seeds the initial weights and, with the step and rank, every batch."""
    world_size: int = 1
    """Ranks (processes); >1 runs under torchrun."""

    def __post_init__(self) -> None:
        _check(self.world_size >= 1, f"world_size {self.world_size} must be >= 1")
        _check(self.schedule.warmup_steps <= self.schedule.max_steps,
               f"schedule.warmup_steps {self.schedule.warmup_steps} exceeds "
               f"max_steps {self.schedule.max_steps}")
        _check(self.adapter.kind == "full" or self.model.pretrained_dir is not None,
               "adapter.kind='lora' needs a base model (model.pretrained_dir): adapters on "
               "random weights learn nothing useful")

    @classmethod
    def from_preset(cls, name: str, /, **overrides: Any) -> TrainConfig:
        """The preset `name` (see `PRESETS`) as a config, with `overrides` applied.

        An override names a field, either alone where that is unambiguous
        (`max_steps=8`, `precision="bf16"`, `world_size=2`) or with its component
        (`checkpoint_interval=2`, `engine_kind="deepspeed"`). Unless
        `warmup_steps` is given, the preset's warm-up is cut to `max_steps`.
        """
        try:
            preset = PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
        base = cls(
            model=ModelSpec(hidden_size=preset.hidden_size, num_layers=preset.num_layers,
                            num_heads=preset.num_heads,
                            intermediate_size=preset.intermediate_size),
            batch=BatchConfig(seq_len=preset.seq_len, micro_batch=preset.micro_batch),
            optimizer=OptimizerConfig(learning_rate=preset.learning_rate),
            schedule=ScheduleConfig(warmup_steps=preset.warmup_steps),
        )
        changes: dict[str, dict[str, Any]] = {}
        for key, value in overrides.items():
            if key not in _OVERRIDES:
                raise ConfigError(
                    f"unknown override {key!r} for preset {name!r}: give a field of the config "
                    f"({', '.join(sorted(k for k, (c, f) in _OVERRIDES.items() if k == f))}), "
                    "or component_field (checkpoint_interval, engine_kind, ...)")
            component, field_name = _OVERRIDES[key]
            wanted = changes.setdefault(component, {})
            _check(field_name not in wanted,
                   f"override {key!r} sets {component or 'config'}.{field_name} twice")
            current = getattr(getattr(base, component), field_name) if component else getattr(
                base, field_name)
            wanted[field_name] = _same_type(key, current, value)
        schedule = changes.get("schedule", {})
        if "max_steps" in schedule and "warmup_steps" not in schedule:
            schedule["warmup_steps"] = min(preset.warmup_steps, schedule["max_steps"])
        parts = {component: replace(getattr(base, component), **changes.get(component, {}))
                 for component in _COMPONENTS}
        return cls(**parts, **changes.get("", {}))

    def plan_fields(self) -> dict[str, Any]:
        """This config as `lmforge.v1.ResourcePlan` fields: `from_plan` reads them back.

        Optimizer details, the learning-rate floor and checkpoints kept are not
        part of a plan; `from_plan` gives them their
        defaults.
        """
        m, b, e = self.model, self.batch, self.engine
        return {
            "family": m.family, "hidden_size": m.hidden_size, "num_layers": m.num_layers,
            "num_heads": m.num_heads, "intermediate_size": m.intermediate_size,
            "seq_len": b.seq_len, "micro_batch": b.micro_batch, "grad_accum": b.grad_accum,
            "learning_rate": self.optimizer.learning_rate,
            "max_steps": self.schedule.max_steps, "warmup_steps": self.schedule.warmup_steps,
            "checkpoint_interval": self.checkpoint.interval,
            "preemptions_per_hour": self.checkpoint.preemptions_per_hour,
            "time_budget_s": self.schedule.time_budget_s,
            "engine": e.kind, "precision": e.precision, "zero_stage": e.zero_stage,
            "offload_optimizer": e.offload_optimizer, "offload_params": e.offload_params,
            "gradient_checkpointing": e.gradient_checkpointing, "compile": e.compile,
            "seed": self.seed, "world_size": self.world_size,
            "base_model": str(m.pretrained_dir or ""),
            "adaptation": self.adapter.kind if m.pretrained_dir else "",
            "lora_rank": self.adapter.rank, "lora_alpha": self.adapter.alpha,
            "lora_dropout": self.adapter.dropout, "lora_targets": list(self.adapter.targets),
            "base_weights": self.adapter.base_weights,
        }

    @classmethod
    def from_plan(cls, plan: Any) -> TrainConfig:
        """Build from an `lmforge.v1.ResourcePlan` (or any object with its fields)."""
        base_model = getattr(plan, "base_model", "")
        adapter = AdapterConfig()
        if base_model and getattr(plan, "adaptation", "") == "lora":
            adapter = AdapterConfig(
                kind="lora", rank=plan.lora_rank or adapter.rank,
                alpha=plan.lora_alpha or 2.0 * (plan.lora_rank or adapter.rank),
                dropout=plan.lora_dropout,
                targets=tuple(plan.lora_targets) or adapter.targets,
                base_weights=plan.base_weights)
        return cls(
            model=ModelSpec(family=getattr(plan, "family", "") or "llama",
                            hidden_size=plan.hidden_size, num_layers=plan.num_layers,
                            num_heads=plan.num_heads,
                            intermediate_size=plan.intermediate_size,
                            pretrained_dir=Path(base_model) if base_model else None),
            adapter=adapter,
            batch=BatchConfig(seq_len=plan.seq_len, micro_batch=plan.micro_batch,
                              grad_accum=max(1, plan.grad_accum)),
            optimizer=OptimizerConfig(learning_rate=plan.learning_rate),
            schedule=ScheduleConfig(max_steps=plan.max_steps,
                                    warmup_steps=min(plan.warmup_steps, plan.max_steps),
                                    time_budget_s=getattr(plan, "time_budget_s", 0.0)),
            checkpoint=CheckpointConfig(
                interval=max(1, plan.checkpoint_interval),
                preemptions_per_hour=getattr(plan, "preemptions_per_hour", 0.0)),
            engine=EngineConfig(
                kind=getattr(plan, "engine", "") or "plain",
                precision=plan.precision or "fp32",
                zero_stage=getattr(plan, "zero_stage", 0),
                offload_optimizer=getattr(plan, "offload_optimizer", False),
                offload_params=getattr(plan, "offload_params", False),
                gradient_checkpointing=getattr(plan, "gradient_checkpointing", False),
                compile=getattr(plan, "compile", False),
            ),
            seed=plan.seed,
            world_size=max(1, getattr(plan, "world_size", 1)),
        )


_COMPONENTS: dict[str, type] = {
    "model": ModelSpec, "batch": BatchConfig, "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig, "checkpoint": CheckpointConfig, "engine": EngineConfig,
    "adapter": AdapterConfig,
}


def _override_targets() -> dict[str, tuple[str, str]]:
    """Override name -> (component, field); "" is the config itself. Checked at import:
    a field name shared by two components must be given with its component."""
    plain: dict[str, list[tuple[str, str]]] = {}
    for component, component_type in _COMPONENTS.items():
        for f in fields(component_type):
            plain.setdefault(f.name, []).append((component, f.name))
    for f in fields(TrainConfig):
        if f.name not in _COMPONENTS:
            plain.setdefault(f.name, []).append(("", f.name))
    targets = {name: where[0] for name, where in plain.items() if len(where) == 1}
    for component, component_type in _COMPONENTS.items():
        targets.update({f"{component}_{f.name}": (component, f.name)
                        for f in fields(component_type)})
    return targets


_OVERRIDES = _override_targets()


def _same_type(key: str, current: object, value: object) -> object:
    """`value` if it has the type of the field's current value (ints pass for floats)."""
    if current is None:
        return value
    if type(current) is float and type(value) is int:
        return float(value)
    if type(current) is tuple and type(value) is list:
        value = tuple(value)
    _check(type(value) is type(current),
           f"override {key}={value!r} must be of type {type(current).__name__}")
    return value


def config_to_dict(config: TrainConfig) -> dict:
    from dataclasses import asdict

    data = asdict(config)
    if data["model"]["pretrained_dir"] is not None:
        data["model"]["pretrained_dir"] = str(data["model"]["pretrained_dir"])
    return data


def config_from_dict(data: dict) -> TrainConfig:
    model = dict(data["model"])
    if model.get("pretrained_dir"):
        model["pretrained_dir"] = Path(model["pretrained_dir"])
    optimizer = dict(data["optimizer"])
    optimizer["betas"] = tuple(optimizer["betas"])
    return TrainConfig(
        model=ModelSpec(**model), batch=BatchConfig(**data["batch"]),
        optimizer=OptimizerConfig(**optimizer), schedule=ScheduleConfig(**data["schedule"]),
        checkpoint=CheckpointConfig(**data["checkpoint"]), engine=EngineConfig(**data["engine"]),
        adapter=AdapterConfig(**{**data["adapter"], "targets": tuple(data["adapter"]["targets"])}),
        seed=data["seed"], world_size=data["world_size"])
