"""The planner: which hardware, how many, and how to lay the job out on it.

For a run it searches instance type × device count × market (spot or
on-demand) × ZeRO stage × offload × micro-batch × gradient accumulation (the
global batch is kept) × activation checkpointing × precision (bf16 where the
device computes it, else fp16 with the loss scaler, else fp32) × torch.compile.
Each candidate is checked against the device's memory (memory_model.py) and
timed (throughput_model.py, calibrated by measured runs where there are some);
spot candidates pay Daly's expected overhead for their preemption rate at the
Young/Daly checkpoint interval (lmforge.checkpoint_interval).

The choice: the cheapest plan that trains all the requested tokens within the
time budget (and the dollar budget, if any); with a dollar budget alone, the
fastest within it. If no plan trains them all, the one that trains the most
within the budgets, and the plan says so. The report ranks the best layout of
every type × count × market and says why each other one was refused. Pure
arithmetic: no NATS, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from lmforge.calibration import Calibration, calibration_key
from lmforge.catalog import MARKETS, InstanceType
from lmforge.checkpoint_interval import (
    checkpoint_interval_steps,
    expected_overhead_share,
    young_daly_interval_s,
)
from lmforge.failures import BadInput
from lmforge.presets import PRESETS, ModelPreset
from services.scheduler.adaptation import (
    Adaptation,
    AdaptationError,
    AdaptationRequest,
    base_preset,
    resolve_adaptation,
)
from services.scheduler.memory_model import GIB, MemoryEstimate, Parallelism, estimate_memory
from services.scheduler.throughput_model import StepTime, step_time

FAMILIES = ("llama", "qwen2")
COMPILE_WARMUP_S = 60.0
"""torch.compile's first steps: 41-125 s measured on the H200 (train_gpu_h200.json)."""
CALIBRATION_PASSES = 4
"""Timed forward/backward passes the trainer runs before its first step (1 warm-up + 3)."""
RESTART_S = 180.0
"""A preempted spot job's restart: a new instance, the checkpoint fetched, the model
rebuilt (the seed's target: state moved in under 3 minutes)."""
CHECKPOINT_BYTES_PER_PARAMETER = 12
"""fp32 weights and Adam's m and v: what a checkpoint writes (gradients are not saved)."""
CHECKPOINT_FIXED_S = 1.0
"""Per checkpoint, whatever its size: directory, manifest, digest, index."""
DEFAULT_EPOCHS = 4.0
LAYOUTS: tuple[tuple[int, bool, bool], ...] = (
    (0, False, False), (1, False, False), (2, False, False), (3, False, False),
    (2, True, False), (3, True, False), (3, True, True))
"""(ZeRO stage, offload optimizer, offload params); stage 0 is the plain engine."""


class PlanError(BadInput, ValueError):
    """The request cannot be planned; the message gives the numbers."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanRequest:
    train_tokens: int
    vocab_size: int
    seq_len: int
    time_budget_s: float = 0.0
    """0 = no time budget (then a dollar budget is needed)."""
    budget_usd: float = 0.0
    """0 = no dollar budget."""
    preset: str = "tiny"
    family: str = "llama"
    instance_types: tuple[str, ...] = ()
    """Only these catalog types; empty = every type the caller passes."""
    precision: str = ""
    """Forced precision; "" = each type's native one."""
    compile: str = ""
    """"on", "off" or "" (the planner decides)."""
    micro_batch: int = 0
    grad_accum: int = 0
    global_batch: int = 0
    """Sequences per optimizer step; 0 = the preset's."""
    epochs: float = DEFAULT_EPOCHS
    market: str = ""
    """"spot", "on-demand" or "" (either)."""
    seed: int = 1234
    gradient_checkpointing: str = ""
    """"on", "off" or "" (the planner decides)."""
    adaptation: AdaptationRequest | None = None
    """Adapt this base model (its shape and size replace the preset's); None: from scratch."""


@dataclass(frozen=True, slots=True)
class Option:
    """One candidate, evaluated."""

    instance: InstanceType
    market: str
    parallelism: Parallelism
    micro_batch: int
    grad_accum: int
    precision: str
    compiled: bool
    memory: MemoryEstimate
    step: StepTime
    steps_needed: int
    max_steps: int
    seconds: float
    usd: float
    checkpoint_cost_s: float
    checkpoint_interval: int
    checkpoint_interval_s: float
    """Young/Daly's interval (0 when nothing preempts: then every tenth of the run)."""

    @property
    def count(self) -> int:
        return self.parallelism.world_size

    @property
    def complete(self) -> bool:
        return self.max_steps >= self.steps_needed

    @property
    def headroom_gib(self) -> float:
        return self.instance.memory_gib - self.memory.total_bytes / GIB

    @property
    def price_per_hour(self) -> float:
        price = self.instance.price_per_device_hour(self.market)
        assert price is not None, "spot options exist only where spot is sold"
        return price * self.count

    @property
    def label(self) -> str:
        return f"{self.instance.name} x{self.count} {self.market}"

    def describe(self) -> str:
        return (f"{self.parallelism.describe()}, {self.precision}"
                f"{', compiled' if self.compiled else ''}, micro-batch {self.micro_batch}"
                f" x accumulation {self.grad_accum}")


@dataclass(frozen=True, slots=True)
class Refusal:
    label: str
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    """The chosen option as the trainer needs it."""

    preset: ModelPreset
    family: str
    seq_len: int
    learning_rate: float
    warmup_steps: int
    parameters: int
    vocab_size: int
    seed: int
    option: Option
    time_budget_s: float
    adaptation: Adaptation | None = None

    @property
    def parallelism(self) -> Parallelism:
        return self.option.parallelism

    @property
    def memory(self) -> MemoryEstimate:
        return self.option.memory


@dataclass(frozen=True, slots=True)
class PlanReport:
    plan: Plan
    ranked: list[Option]
    """The best layout of each type x count x market that can run, best first."""
    refused: list[Refusal] = field(default_factory=list)
    note: str = ""
    """What the choice could not do, in words ("" when it trains everything asked)."""
    tokens_requested: int = 0


def _check_request(request: PlanRequest) -> ModelPreset:
    if request.gradient_checkpointing not in ("", "on", "off"):
        raise PlanError(f"gradient checkpointing {request.gradient_checkpointing!r} must be "
                        "'on', 'off' or ''")
    if request.adaptation is not None:
        base = request.adaptation.base
        if request.family != base.family:
            raise PlanError(f"family {request.family!r} asked for, but the base model "
                            f"{base.directory} is {base.family}")
        return base_preset(base)
    if request.preset not in PRESETS:
        raise PlanError(f"unknown model size {request.preset!r}; known: {sorted(PRESETS)}")
    if request.family not in FAMILIES:
        raise PlanError(f"unknown model family {request.family!r}; known: {FAMILIES}")
    if request.train_tokens <= request.seq_len:
        raise PlanError(
            f"the dataset has {request.train_tokens} training tokens, fewer than one "
            f"sequence of {request.seq_len}; add data or lower LMFORGE_DATAPREP_SEQ_LEN")
    if request.time_budget_s < 0 or request.budget_usd < 0:
        raise PlanError("budgets must not be negative")
    if request.time_budget_s == 0 and request.budget_usd == 0:
        raise PlanError("give a time budget, a dollar budget or both")
    if request.compile not in ("", "on", "off"):
        raise PlanError(f"compile {request.compile!r} must be 'on', 'off' or ''")
    if request.market not in ("", *MARKETS):
        raise PlanError(f"market {request.market!r} must be one of {MARKETS} or ''")
    if request.epochs <= 0:
        raise PlanError(f"epochs {request.epochs} must be positive")
    return PRESETS[request.preset]


def _micro_batches(per_device: int, request: PlanRequest) -> list[int]:
    if request.micro_batch:
        return [request.micro_batch] if per_device % request.micro_batch == 0 else []
    if request.grad_accum:
        return [per_device // request.grad_accum] if per_device % request.grad_accum == 0 else []
    sizes = {per_device} | {1 << k for k in range(12) if (1 << k) <= per_device}
    return sorted((m for m in sizes if per_device % m == 0), reverse=True)


@dataclass(frozen=True, slots=True)
class _Context:
    request: PlanRequest
    preset: ModelPreset
    parameters: int
    calibrations: Mapping[str, Calibration]
    adaptation: Adaptation | None = None

    @property
    def tokens_requested(self) -> int:
        return int(self.request.epochs * self.request.train_tokens)


def _evaluate(ctx: _Context, instance: InstanceType, market: str, par: Parallelism,
              micro: int, accum: int, precision: str, compiled: bool,
              memory: MemoryEstimate) -> Option | None:
    """Time and price one candidate within the budgets; None if no step fits them."""
    request = ctx.request
    calibration = ctx.calibrations.get(calibration_key(instance.name, precision))
    step = step_time(instance, ctx.preset, parameters=ctx.parameters,
                     vocab_size=request.vocab_size, seq_len=request.seq_len,
                     micro_batch=micro, grad_accum=accum, precision=precision,
                     compiled=compiled, parallelism=par, calibration=calibration)
    tokens_per_step = micro * accum * par.world_size * request.seq_len
    steps_needed = max(1, math.ceil(ctx.tokens_requested / tokens_per_step))
    write_rate = (calibration.checkpoint_gb_per_s if calibration and
                  calibration.checkpoint_gb_per_s else instance.checkpoint_write_gb_per_s)
    checkpoint_cost = (CHECKPOINT_FIXED_S + CHECKPOINT_BYTES_PER_PARAMETER * ctx.parameters
                       / par.world_size / (write_rate * 1e9))
    rate = instance.preemptions_per_hour(market)
    fixed = (COMPILE_WARMUP_S if compiled else 0.0) + CALIBRATION_PASSES * step.total_s
    interval = checkpoint_interval_steps(step_seconds=step.total_s, total_steps=steps_needed,
                                         checkpoint_cost_s=checkpoint_cost,
                                         preemptions_per_hour=rate)
    share = expected_overhead_share(interval_s=interval * step.total_s,
                                    checkpoint_cost_s=checkpoint_cost,
                                    preemptions_per_hour=rate, restart_s=RESTART_S)
    per_step = step.total_s * (1 + share)
    allowed = steps_needed
    if request.time_budget_s:
        allowed = min(allowed, math.floor((request.time_budget_s - fixed) / per_step))
    price = instance.price_per_device_hour(market)
    assert price is not None
    hourly = price * par.world_size
    if request.budget_usd and hourly > 0:
        allowed = min(allowed, math.floor((request.budget_usd / hourly * 3600 - fixed)
                                          / per_step))
    if allowed < 1:
        return None
    seconds = fixed + allowed * per_step
    if allowed < steps_needed:  # a tenth of the run that fits, when nothing preempts
        interval = checkpoint_interval_steps(
            step_seconds=step.total_s, total_steps=allowed, checkpoint_cost_s=checkpoint_cost,
            preemptions_per_hour=rate)
    return Option(instance, market, par, micro, accum, precision, compiled, memory, step,
                  steps_needed, allowed, seconds, hourly * seconds / 3600, checkpoint_cost,
                  interval, young_daly_interval_s(checkpoint_cost, rate))


def _rank_key(option: Option, request: PlanRequest) -> tuple:
    fastest_first = bool(request.budget_usd) and not request.time_budget_s
    objective = ((option.seconds, option.usd) if fastest_first
                 else (option.usd, option.seconds))
    p = option.parallelism
    tokens = option.max_steps * option.micro_batch * option.grad_accum * option.count
    return (not option.complete, 0 if option.complete else -tokens, *objective,
            option.count, p.zero_stage, p.offload_optimizer, p.offload_params,
            p.gradient_checkpointing, option.compiled, -option.micro_batch)


def _layouts(instance: InstanceType, count: int, checkpointing_asked: str = ""
             ) -> Iterator[Parallelism]:
    choices = {"on": (True,), "off": (False,)}.get(checkpointing_asked, (False, True))
    for stage, offload_optimizer, offload_params in LAYOUTS:
        if stage and instance.device == "cpu":
            continue  # one CPU process: no ZeRO, and nowhere to offload to
        for checkpointing in choices:
            yield Parallelism(engine="deepspeed" if stage else "plain", zero_stage=stage,
                              world_size=count, gradient_checkpointing=checkpointing,
                              offload_optimizer=offload_optimizer, offload_params=offload_params)


def _search_group(ctx: _Context, instance: InstanceType, market: str, count: int
                  ) -> Option | Refusal:
    """The best option of one type x market x count, or why there is none."""
    request = ctx.request
    label = f"{instance.name} x{count} {market}"
    global_batch = request.global_batch or ctx.preset.micro_batch
    if global_batch % count:
        return Refusal(label, f"the global batch of {global_batch} sequences does not "
                       f"split over {count} devices")
    precision = request.precision or instance.native_precision()
    if instance.tflops.get(precision, 0) <= 0:
        return Refusal(label, f"{precision} asked for, but {instance.accelerator} computes "
                       f"only {sorted(instance.tflops)}")
    per_device = global_batch // count
    micros = _micro_batches(per_device, request)
    if not micros:
        return Refusal(label, f"micro-batch {request.micro_batch or '-'} / accumulation "
                       f"{request.grad_accum or '-'} does not divide the {per_device} "
                       "sequences per device")
    compile_choices = {"on": (True,), "off": (False,)}.get(request.compile, (False, True))
    best: Option | None = None
    leanest: tuple[MemoryEstimate, Parallelism] | None = None
    over_budget = False
    adapting = ctx.adaptation
    if adapting is not None and adapting.base_weights and instance.device != "cuda":
        return Refusal(label, f"{adapting.base_weights} base weights (QLoRA) need "
                       f"bitsandbytes' CUDA kernels; {instance.accelerator} has none")
    adapters = ((adapting.trainable_parameters, adapting.frozen_bytes_per_parameter)
                if adapting is not None and adapting.kind == "lora" else None)
    for par in _layouts(instance, count, request.gradient_checkpointing):
        for micro in micros:
            memory = estimate_memory(ctx.parameters, ctx.preset, micro_batch=micro,
                                     seq_len=request.seq_len, vocab_size=request.vocab_size,
                                     parallelism=par, adapters=adapters)
            if memory.total_bytes > instance.memory_gib * GIB:
                if leanest is None or memory.total_bytes < leanest[0].total_bytes:
                    leanest = (memory, par)
                continue
            for compiled in compile_choices:
                option = _evaluate(ctx, instance, market, par, micro, per_device // micro,
                                   precision, compiled, memory)
                if option is None:
                    over_budget = True
                elif best is None or _rank_key(option, request) < _rank_key(best, request):
                    best = option
    if best is not None:
        return best
    if over_budget:
        return Refusal(label, "the budget does not cover one step after the calibration "
                       "passes (and compile warm-up, if compiled)")
    assert leanest is not None
    memory, par = leanest
    return Refusal(label, f"does not fit: the leanest layout ({par.describe()}) needs "
                   f"{memory.describe(par)} — but a device has {instance.memory_gib:.1f} GiB")


def plan_training(request: PlanRequest, instances: list[InstanceType],
                  calibrations: Mapping[str, Calibration] | None = None) -> PlanReport:
    """Search every candidate on `instances` (already filtered to what may be used).

    Adapting a base model with no adaptation asked for: full fine-tuning where some
    device fits it, else LoRA, and the plan says why.
    """
    asked = request.adaptation
    try:
        if asked is None:
            return _plan(request, instances, calibrations, None)
        if asked.kind:
            return _plan(request, instances, calibrations, resolve_adaptation(asked, asked.kind))
        try:
            return _plan(request, instances, calibrations, resolve_adaptation(
                asked, "full", "full fine-tuning fits; chosen as no adaptation was asked for"))
        except PlanError as full_refused:
            return _plan(request, instances, calibrations, resolve_adaptation(
                asked, "lora", f"LoRA, as full fine-tuning has no plan: {full_refused}"))
    except AdaptationError as exc:
        raise PlanError(str(exc)) from None


def _plan(request: PlanRequest, instances: list[InstanceType],
          calibrations: Mapping[str, Calibration] | None,
          adaptation: Adaptation | None) -> PlanReport:
    preset = _check_request(request)
    if not instances:
        raise PlanError("no instance types to plan on")
    parameters = (adaptation.base.parameters if adaptation is not None
                  else preset.parameters(request.vocab_size))
    ctx = _Context(request, preset, parameters, calibrations or {}, adaptation)
    options: list[Option] = []
    refused: list[Refusal] = []
    for instance in instances:
        for market in MARKETS:
            if request.market and market != request.market:
                continue
            if instance.price_per_device_hour(market) is None:
                refused.append(Refusal(f"{instance.name} {market}",
                                       f"{market} is not sold for {instance.name}"))
                continue
            for count in instance.counts:
                found = _search_group(ctx, instance, market, count)
                if isinstance(found, Option):
                    options.append(found)
                else:
                    refused.append(found)
    if not options:
        reasons = "; ".join(f"{r.label}: {r.reason}" for r in refused)
        raise PlanError(f"no plan for {preset.name} ({ctx.parameters / 1e6:.1f}M parameters) "
                        f"on {[i.name for i in instances]}: {reasons}")
    options.sort(key=lambda o: _rank_key(o, request))
    chosen = options[0]
    note = ""
    if chosen.complete:
        for option in [o for o in options if not o.complete]:
            refused.append(Refusal(option.label, _why_incomplete(option, request)))
        options = [o for o in options if o.complete]
    else:
        trained = chosen.max_steps / chosen.steps_needed
        note = (f"no option trains the requested {ctx.tokens_requested:,} tokens "
                f"({request.epochs:g} epochs) within the budget; the chosen one trains "
                f"{trained:.1%} of them ({chosen.max_steps} of {chosen.steps_needed} steps)")
    plan = Plan(preset=preset, family=request.family, seq_len=request.seq_len,
                learning_rate=(adaptation.learning_rate if adaptation is not None
                               else preset.learning_rate), adaptation=adaptation,
                warmup_steps=min(100, max(1, chosen.max_steps // 10)),
                parameters=ctx.parameters, vocab_size=request.vocab_size, seed=request.seed,
                option=chosen, time_budget_s=request.time_budget_s)
    return PlanReport(plan, options, refused, note, ctx.tokens_requested)


def _why_incomplete(option: Option, request: PlanRequest) -> str:
    full_s = option.seconds / option.max_steps * option.steps_needed
    full_usd = option.usd / option.max_steps * option.steps_needed
    over = []
    if request.time_budget_s and full_s > request.time_budget_s:
        over.append(f"{full_s / 3600:.2f} h, over the {request.time_budget_s / 3600:.2f} h "
                    "budget")
    if request.budget_usd and full_usd > request.budget_usd:
        over.append(f"${full_usd:,.2f}, over the ${request.budget_usd:,.2f} budget")
    return f"needs {' and '.join(over)} (best layout: {option.describe()})"
