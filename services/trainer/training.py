"""The training loop: a Llama built from the plan, AdamW, bf16 autocast, cosine schedule.

Resume is exact: the batch of step k is drawn from a generator seeded by
(seed, k), so the data position is the step number, and the model, optimizer,
scheduler and RNG states come back from the checkpoint. A stop request (a
spot notice, SIGTERM) is honoured between steps: checkpoint, then return.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lmforge.artifacts import ArtifactStore
from lmforge.modeling import llama_config, load_token_stream, perplexity
from services.trainer.checkpoints import CheckpointIndex, CheckpointRef


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    seq_len: int
    micro_batch: int
    max_steps: int
    learning_rate: float
    warmup_steps: int
    checkpoint_interval: int
    precision: str = "bf16"
    """fp32, or bf16 autocast (weights and optimizer stay fp32)."""
    seed: int = 1234
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1
    """Cosine decays to this fraction of the peak learning rate."""

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps {self.max_steps} must be at least 1")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {self.precision!r} must be fp32 or bf16")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by "
                             f"num_heads {self.num_heads}")
        if self.checkpoint_interval < 1:
            raise ValueError("checkpoint_interval must be at least 1")


@dataclass(slots=True)
class Progress:
    step: int
    total_steps: int
    loss: float
    learning_rate: float
    tokens_per_second: float
    eta_seconds: float


@dataclass(slots=True)
class TrainResult:
    preempted: bool
    step: int
    model_dir: Path | None = None
    heldout_perplexity: float = 0.0
    final_loss: float = 0.0
    train_tokens: int = 0
    wall_seconds: float = 0.0
    parameters: int = 0
    resumed_from_step: int = 0
    checkpoint: CheckpointRef | None = None
    losses: list[float] = field(default_factory=list)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio of the peak (as a factor)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


def batch_for_step(tokens: np.ndarray, step: int, config: TrainConfig) -> torch.Tensor:
    rng = np.random.Generator(np.random.PCG64([config.seed, step]))
    high = len(tokens) - config.seq_len
    starts = rng.integers(0, high + 1, size=config.micro_batch)
    return torch.from_numpy(np.stack([tokens[s : s + config.seq_len] for s in starts]))


class Trainer:
    def __init__(self, config: TrainConfig, dataset_dir: Path, store: ArtifactStore,
                 index: CheckpointIndex) -> None:
        self.config = config
        self.dataset_dir = dataset_dir
        self.store = store
        self.index = index
        meta = json.loads((dataset_dir / "dataset.json").read_text())
        self.meta = meta
        self.train_tokens = load_token_stream(dataset_dir, "train")
        if len(self.train_tokens) <= config.seq_len:
            raise ValueError(f"{len(self.train_tokens)} training tokens: fewer than one "
                             f"sequence of {config.seq_len}")
        torch.manual_seed(config.seed)
        pad_id = json.loads((dataset_dir / "tokenizer" / "tokenizer.json").read_text())
        pad_token_id = pad_id["model"]["vocab"].get("<|pad|>", meta["eos_token_id"])
        self.model_config = llama_config(
            vocab_size=meta["vocab_size"], hidden_size=config.hidden_size,
            num_layers=config.num_layers, num_heads=config.num_heads,
            intermediate_size=config.intermediate_size, seq_len=config.seq_len,
            eos_token_id=meta["eos_token_id"], pad_token_id=pad_token_id,
        )
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM(self.model_config)
        self.model.train()
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=config.learning_rate, betas=config.betas, foreach=True,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_at(step, config)
        )
        self.step = 0

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # -- checkpoints --------------------------------------------------------------

    def save_checkpoint(self) -> CheckpointRef:
        work = self.store.scratch_dir("ckpt-")
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()},
                  str(work / "model.safetensors"))
        torch.save({
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }, work / "state.pt")
        (work / "trainer_state.json").write_text(json.dumps({"step": self.step}))
        stored = self.store.put_dir(work, move=True)
        ref = CheckpointRef(self.step, stored.digest)
        self.index.add(ref)
        return ref

    def try_resume(self) -> int:
        found = self.index.latest_good()
        if found is None:
            return 0
        _ref, path = found
        self.model.load_state_dict(load_file(str(path / "model.safetensors")))
        state = torch.load(path / "state.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = json.loads((path / "trainer_state.json").read_text())["step"]
        return self.step

    # -- the loop -----------------------------------------------------------------

    def train_step(self) -> float:
        x = batch_for_step(self.train_tokens, self.step, self.config)
        with torch.autocast("cpu", dtype=torch.bfloat16,
                            enabled=self.config.precision == "bf16"):
            loss = self.model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.item()

    def run(self, *, stop: threading.Event | None = None,
            on_progress: Callable[[Progress], None] | None = None,
            on_checkpoint: Callable[[CheckpointRef], None] | None = None,
            progress_every_s: float = 1.0) -> TrainResult:
        config = self.config
        started = time.perf_counter()
        resumed_from = self.try_resume()
        losses: list[float] = []
        last_report, window_tokens, window_start = 0.0, 0, time.perf_counter()
        tokens_per_step = config.micro_batch * config.seq_len
        while self.step < config.max_steps:
            if stop is not None and stop.is_set():
                ref = self.save_checkpoint()
                if on_checkpoint:
                    on_checkpoint(ref)
                return TrainResult(preempted=True, step=self.step, checkpoint=ref,
                                   resumed_from_step=resumed_from, losses=losses)
            loss = self.train_step()
            losses.append(loss)
            window_tokens += tokens_per_step
            now = time.perf_counter()
            if on_progress and (now - last_report >= progress_every_s
                                or self.step == config.max_steps):
                rate = window_tokens / max(now - window_start, 1e-9)
                remaining = (config.max_steps - self.step) * tokens_per_step / max(rate, 1e-9)
                on_progress(Progress(self.step, config.max_steps, loss,
                                     self.scheduler.get_last_lr()[0], rate, remaining))
                last_report, window_tokens, window_start = now, 0, now
            if self.step % config.checkpoint_interval == 0 and self.step < config.max_steps:
                ref = self.save_checkpoint()
                if on_checkpoint:
                    on_checkpoint(ref)
        heldout = load_token_stream(self.dataset_dir, "heldout")
        ppl = perplexity(self.model, heldout, seq_len=config.seq_len)
        model_dir = self.export_hf()
        return TrainResult(
            preempted=False, step=self.step, model_dir=model_dir, heldout_perplexity=ppl,
            final_loss=losses[-1] if losses else float("nan"),
            train_tokens=(self.step - resumed_from) * tokens_per_step,
            wall_seconds=time.perf_counter() - started, parameters=self.parameters,
            resumed_from_step=resumed_from, losses=losses,
        )

    def export_hf(self) -> Path:
        """A Hugging Face directory: config, safetensors, tokenizer, generation config."""
        from transformers import GenerationConfig

        out = self.store.scratch_dir("model-")
        self.model.save_pretrained(str(out), safe_serialization=True)
        for item in (self.dataset_dir / "tokenizer").iterdir():
            shutil.copy2(item, out / item.name)
        GenerationConfig(
            bos_token_id=self.model_config.bos_token_id,
            eos_token_id=self.model_config.eos_token_id,
            pad_token_id=self.model_config.pad_token_id,
            do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=64,
        ).save_pretrained(str(out))
        return out
