"""Two training engines behind one interface: plain PyTorch and DeepSpeed.

An engine owns the model, the optimizer, the learning-rate schedule and the
mixed-precision machinery, and does one optimizer step from a list of
micro-batches. It saves and loads its full state into a directory (the
checkpoint) and hands out a consolidated fp32 state dict for the export.
The training loop (training.py) does not know which engine it drives.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from safetensors.torch import load_file, save_file

from services.trainer.adaptation import (
    checkpoint_state_dict,
    is_lora,
    load_checkpoint_state_dict,
)
from services.trainer.config import TrainConfig
from services.trainer.conversations import Batch, model_inputs

if TYPE_CHECKING:  # transformers is imported where a model is built, not here
    from transformers import PreTrainedModel


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio of the peak."""
    s = config.schedule
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    span = max(1, s.max_steps - s.warmup_steps)
    progress = min(1.0, (step - s.warmup_steps) / span)
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


class Engine(Protocol):
    model: PreTrainedModel

    def train_step(self, micro_batches: list[Batch]) -> float: ...
    def calibration_pass(self, micro_batch: Batch) -> bool:
        """One forward and backward whose gradients are dropped, leaving the weights,
        optimizer and schedule as they were (the trainer times these before its first
        step); False where the engine cannot do that without touching its state."""
        ...
    def learning_rate(self) -> float: ...
    def save(self, directory: Path) -> None: ...
    def load(self, directory: Path) -> None: ...
    def export_state_dict(self) -> dict[str, torch.Tensor] | None: ...


class PlainEngine:
    """PyTorch: fused/foreach AdamW, autocast, GradScaler for fp16, optional compile."""

    def __init__(self, model: PreTrainedModel, config: TrainConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        # Module.to moves the weights in place and returns the module itself. It is
        # called through the base type: transformers wraps PreTrainedModel.to with
        # functools.wraps, which type checkers cannot bind to an instance.
        as_module: torch.nn.Module = model
        as_module.to(device)
        self.model = model
        if config.engine.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        opt = config.optimizer
        # The fused kernel exists for CPU and CUDA tensors; foreach is the fallback.
        try:
            self.optimizer = torch.optim.AdamW(
                parameter_groups(self.model, opt.weight_decay), lr=opt.learning_rate,
                betas=opt.betas, eps=opt.eps, fused=True)
        except (RuntimeError, TypeError):
            self.optimizer = torch.optim.AdamW(
                parameter_groups(self.model, opt.weight_decay), lr=opt.learning_rate,
                betas=opt.betas, eps=opt.eps, foreach=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, config))
        self.dtype = autocast_dtype(config.engine.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.engine.precision == "fp16")
        forward: torch.nn.Module = self.model
        self.ddp = None
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # Data parallel across ranks: gradients are all-reduced in backward.
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
            forward = self.ddp
        self.forward = torch.compile(forward) if config.engine.compile else forward

    def train_step(self, micro_batches: list[Batch]) -> float:
        total = 0.0
        for i, batch in enumerate(micro_batches):
            inputs = model_inputs(batch, self.device)
            # Only the last micro-batch of a step all-reduces gradients.
            sync = (self.ddp.no_sync() if self.ddp is not None and i < len(micro_batches) - 1
                    else contextlib.nullcontext())
            with sync:
                with torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                                    enabled=self.dtype is not None):
                    loss = self.forward(**inputs).loss / len(micro_batches)
                self.scaler.scale(loss).backward()
            total += loss.detach()
        if self.config.optimizer.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optimizer.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total)

    def calibration_pass(self, micro_batch: Batch) -> bool:
        inputs = model_inputs(micro_batch, self.device)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                            enabled=self.dtype is not None):
            loss = self.forward(**inputs).loss
        loss.backward()  # unscaled: an fp16 overflow here does not matter, nothing steps
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, directory: Path) -> None:
        save_file(checkpoint_state_dict(self.model), str(directory / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict()}, directory / "engine_state.pt")

    def load(self, directory: Path) -> None:
        load_checkpoint_state_dict(self.model, load_file(str(directory / "model.safetensors"),
                                                         device=str(self.device)))
        state = torch.load(directory / "engine_state.pt", weights_only=True,
                           map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu() for k, v in self.model.state_dict().items()}


def deepspeed_config(config: TrainConfig) -> dict:
    """The DeepSpeed config, generated from the plan (never hand-edited JSON)."""
    e = config.engine
    zero: dict = {"stage": e.zero_stage}
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if e.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if e.zero_stage == 3:
        # Deterministic gathering; no parameter persistence threshold surprises.
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_micro_batch_size_per_gpu": config.batch.micro_batch,
        "gradient_accumulation_steps": config.batch.grad_accum,
        "gradient_clipping": config.optimizer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": e.precision == "bf16"},
        "fp16": {"enabled": e.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """deepspeed.initialize over the same model: ZeRO 1-3, offload, bf16/fp16."""

    def __init__(self, model: PreTrainedModel, config: TrainConfig, device: torch.device) -> None:
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        self.config = config
        opt = config.optimizer
        if config.engine.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        groups = parameter_groups(model, opt.weight_decay)
        if config.engine.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # compiled on first use

            optimizer = DeepSpeedCPUAdam(groups, lr=opt.learning_rate, betas=opt.betas,
                                         eps=opt.eps, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=opt.learning_rate, betas=opt.betas,
                                          eps=opt.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                      lambda step: lr_factor(step, config))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(config))
        self.model = self.engine.module
        self.device = self.engine.device
        if config.engine.compile:
            self.engine.compile()  # torch.compile inside DeepSpeed's engine

    def train_step(self, micro_batches: list[Batch]) -> float:
        total = 0.0
        for batch in micro_batches:
            loss = self.engine(**model_inputs(batch, self.device)).loss
            self.engine.backward(loss)
            self.engine.step()  # steps the optimizer at the accumulation boundary only
            total += loss.detach().float() / len(micro_batches)
        return float(total)

    def calibration_pass(self, micro_batch: Batch) -> bool:
        """DeepSpeed counts every backward towards its accumulation boundary and its
        ZeRO hooks reduce gradients into the optimizer's partitions: a pass outside
        a step would shift both. The trainer times its first steps instead."""
        return False

    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, directory: Path) -> None:
        # LoRA: the frozen base is not written (it is rebuilt from its directory).
        self.engine.save_checkpoint(str(directory), tag="engine",
                                    exclude_frozen_parameters=is_lora(self.model))

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag="engine",
                                              load_module_strict=not is_lora(self.model))
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}")

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Consolidated fp32 weights on rank 0 (None elsewhere); gathers ZeRO-3 shards."""
        import deepspeed
        import torch.distributed as dist

        params = list(self.model.parameters())
        gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
                  if self.config.engine.zero_stage == 3 else contextlib.nullcontext())
        with gather:
            if dist.is_initialized() and dist.get_rank() != 0:
                return None
            return {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}


def build_engine(model: PreTrainedModel, config: TrainConfig, device: torch.device) -> Engine:
    if config.engine.kind == "deepspeed":
        return DeepSpeedEngine(model, config, device)
    return PlainEngine(model, config, device)
