"""The training loop, the same for one process or many, for either engine.

Resume is exact: the micro-batch m of step k on rank r is drawn from a
generator seeded by (seed, k, m, r), so the data position is the step number;
that holds for both samplers (uniform windows, or documents drawn by their
long-tail weights, see `WeightedDocumentWindows`), since each is a pure
function of that generator and the dataset;
the engine state (weights, optimizer, schedule, loss scale) and each rank's
RNG state come back from the checkpoint. A stop request (SIGTERM, a spot
notice, or a stop file written by the service) is honoured between steps by
every rank together: checkpoint, then return.

Before the first step the loop calibrates: it times a few forward/backward
passes whose gradients are dropped (the weights, optimizer, schedule and RNG
stay as they were, so a calibrated run trains exactly as an uncalibrated one)
and reports the achieved FLOP/s per device with its first progress; the
scheduler's next plan for the device type uses it. DeepSpeed cannot run a pass
outside a step, so there the first steps are timed instead, and the report says
so. At the plan's time budget every rank checkpoints and the run ends there,
reporting the steps it reached. With a preemption rate in the plan, each
checkpoint's measured cost re-plans the interval by Young/Daly.

With several ranks (torchrun), every rank runs this loop; checkpoints are
written by all ranks into one directory that rank 0 then stores and indexes (on
nodes that share no disk, each node uploads its own files under the checkpoint's
address and only their names and digests go to rank 0, see node_checkpoints.py;
a failure on any rank while checkpointing stops every rank at once, with its reason);
evaluation and export happen on rank 0 after the weights are consolidated.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.distributed as dist

from lmforge.artifacts import ArtifactStore
from lmforge.base_models import GENERATION_CONFIG
from lmforge.checkpoint_interval import checkpoint_interval_steps
from lmforge.modeling import (
    llama_config,
    load_loss_mask,
    load_token_stream,
    load_tokenizer,
    perplexity,
    qwen2_config,
    training_flops_per_token,
)
from lmforge.task_eval import EVAL_SET, TaskEvalResult, evaluate_task, read_eval_set
from services.trainer.adaptation import load_pretrained, merged_and_adapter, with_lora
from services.trainer.checkpoints import CheckpointIndex, CheckpointRef
from services.trainer.config import TrainConfig
from services.trainer.conversations import (
    Batch,
    ConversationRows,
    LabelledBatch,
    assistant_perplexity,
)
from services.trainer.engines import Engine, build_engine
from services.trainer.node_checkpoints import (
    checkpoint_on_this_node,
    make_checkpoint_dir,
    store_checkpoint,
    together,
)

if TYPE_CHECKING:  # transformers is imported where a model is built, not here
    from transformers import PreTrainedModel

log = logging.getLogger("lmforge.trainer")

CALIBRATION_PASSES = 3
"""Timed forward/backward passes (after one untimed warm-up, which also compiles)."""


@dataclass(slots=True)
class Progress:
    step: int
    total_steps: int
    loss: float
    learning_rate: float
    tokens_per_second: float
    eta_seconds: float
    mfu: float = 0.0
    measured_flops: float = 0.0
    """Achieved training FLOP/s per device from the calibration (first report only)."""
    calibration: str = ""
    """How `measured_flops` was measured."""


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
    peak_memory_bytes: int = 0
    """The training steps' peak (resident memory, or CUDA allocated), from the loaded
    model through the last step: not the load's transients, nor the export after."""
    trainable_parameters: int = 0
    task_eval: TaskEvalResult | None = None
    """Exact match and macro-F1 on the run's eval set, when it has one."""
    assistant_perplexity: float = 0.0
    """Chat data: perplexity on the held-out conversations' assistant tokens (0: not chat)."""
    losses: list[float] = field(default_factory=list)
    stopped_at_budget: bool = False
    """The time budget ended the run at `step`, before `planned_steps`."""
    planned_steps: int = 0


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class WindowSampler(Protocol):
    """Where the sequences of a micro-batch come from in the training stream."""

    seq_len: int

    def positions(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """int64 [count, seq_len]: the stream position of every token of `count` sequences,
        drawn from `rng` alone."""
        ...


class UniformWindows:
    """Windows starting anywhere in the stream, uniformly: every token its natural share."""

    def __init__(self, num_tokens: int, seq_len: int) -> None:
        if num_tokens < seq_len:
            raise ValueError(f"{num_tokens} training tokens: fewer than one sequence of "
                             f"{seq_len}")
        self.num_tokens = num_tokens
        self.seq_len = seq_len

    def positions(self, rng: np.random.Generator, count: int) -> np.ndarray:
        starts = rng.integers(0, self.num_tokens - self.seq_len + 1, size=count)
        return starts[:, None] + np.arange(self.seq_len)


@dataclass(frozen=True, slots=True)
class DocumentIndex:
    """Where each document of a packed part lies and its sampling multiplier
    (data-prep's `documents.safetensors`, see services/data_prep/packing.py)."""

    offsets: np.ndarray
    """int64 [documents + 1]: first token of each document, then the part's length."""
    weights: np.ndarray
    """float64 [documents]: 1.0 = the document's natural (by-token) share."""

    @property
    def weighted(self) -> bool:
        return bool(len(self.weights)) and bool(np.any(self.weights != self.weights[0]))


def load_document_index(dataset_dir: Path, part: str) -> DocumentIndex | None:
    """The document index dataset.json names for `part`, or None (datasets packed before
    weights, which the trainer samples uniformly)."""
    from safetensors.numpy import load_file

    meta = json.loads((dataset_dir / "dataset.json").read_text())
    name = meta[part].get("document_index")
    if not name:
        return None
    arrays = load_file(str(dataset_dir / part / name))
    index = DocumentIndex(arrays["offsets"].astype(np.int64),
                          arrays["weights"].astype(np.float64))
    tokens = int(meta[part]["tokens"])
    if len(index.offsets) != len(index.weights) + 1 or index.offsets[-1] != tokens:
        raise ValueError(f"{dataset_dir / part / name} does not match dataset.json: "
                         f"{len(index.weights)} weights, {len(index.offsets)} offsets ending "
                         f"at {index.offsets[-1] if len(index.offsets) else None}, "
                         f"{tokens} tokens; prepare the dataset again")
    if len(index.weights) and not np.all(index.weights > 0):
        raise ValueError(f"{dataset_dir / part / name} has weights <= 0; prepare the "
                         "dataset again")
    return index


class WeightedDocumentWindows:
    """Sequences packed from documents drawn by their weights.

    Each draw picks a piece: a whole document if it is at most `seq_len` tokens,
    else a `seq_len` window placed uniformly inside it. Document d is drawn with
    mass w_d · max(1, n_d / seq_len) (n_d its tokens), so every token is exposed
    in proportion to its document's weight: a short document is drawn w_d times
    as often and shown whole; a long one is drawn for each seq_len of its length.
    The pieces are laid end to end and cut every `seq_len` tokens, so a piece cut
    at the end of one sequence continues in the next and nothing is thrown
    away; a window over the natural stream would instead give most of its tokens
    to whatever documents follow the drawn one. Draws come only from `rng`.
    """

    def __init__(self, document_index: DocumentIndex, seq_len: int) -> None:
        offsets = document_index.offsets
        if offsets[-1] < seq_len:
            raise ValueError(f"{offsets[-1]} training tokens: fewer than one sequence of "
                             f"{seq_len}")
        self.seq_len = seq_len
        self._starts = offsets[:-1]
        self._lengths = np.diff(offsets)
        mass = document_index.weights * np.maximum(1.0, self._lengths / seq_len)
        self._cumulative = np.cumsum(mass)
        piece = np.minimum(self._lengths, seq_len).astype(np.float64)
        self._mean_piece = float((mass * piece).sum() / mass.sum())

    def positions(self, rng: np.random.Generator, count: int) -> np.ndarray:
        wanted = count * self.seq_len
        starts: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        have = 0
        while have < wanted:
            draws = int((wanted - have) / self._mean_piece * 1.25) + 4
            u = rng.random((draws, 2))
            docs = np.searchsorted(self._cumulative, u[:, 0] * self._cumulative[-1],
                                   side="right")
            docs = np.minimum(docs, len(self._lengths) - 1)
            length = self._lengths[docs]
            slack = np.maximum(length - self.seq_len, 0)
            starts.append(self._starts[docs] + (u[:, 1] * (slack + 1)).astype(np.int64))
            lengths.append(np.minimum(length, self.seq_len))
            have += int(lengths[-1].sum())
        start, length = np.concatenate(starts), np.concatenate(lengths)
        pieces = np.searchsorted(np.cumsum(length), wanted) + 1
        start, length = start[:pieces], length[:pieces]
        first = np.cumsum(length) - length
        stream = np.repeat(start - first, length) + np.arange(int(length.sum()))
        return stream[:wanted].reshape(count, self.seq_len)


def build_window_sampler(num_tokens: int, seq_len: int,
                         document_index: DocumentIndex | None) -> WindowSampler:
    """Weighted document sampling where the dataset carries unequal weights, else the
    uniform windows every dataset had before weights (same draws, same batches)."""
    if document_index is None or not document_index.weighted:
        return UniformWindows(num_tokens, seq_len)
    if document_index.offsets[-1] != num_tokens:
        raise ValueError(f"the document index covers {document_index.offsets[-1]} tokens, "
                         f"the stream has {num_tokens}")
    return WeightedDocumentWindows(document_index, seq_len)


def batch_rng(config: TrainConfig, step: int, micro: int, rank: int) -> np.random.Generator:
    """The only randomness a micro-batch's draw may use (exact resume rests on it)."""
    return np.random.Generator(np.random.PCG64([config.seed, step, micro, rank]))


def micro_batch(tokens: np.ndarray, config: TrainConfig, step: int, micro: int,
                rank: int, sampler: WindowSampler | None = None) -> torch.Tensor:
    """Micro-batch `micro` of `step` on `rank`: a pure function of those, the seed and
    the data, so a resumed run draws exactly the batches an uninterrupted one would."""
    rng = batch_rng(config, step, micro, rank)
    sampler = sampler or UniformWindows(len(tokens), config.batch.seq_len)
    return torch.from_numpy(tokens[sampler.positions(rng, config.batch.micro_batch)])


def chat_micro_batch(tokens: np.ndarray, config: TrainConfig, step: int, micro: int,
                     rank: int, rows: ConversationRows) -> LabelledBatch:
    """`micro_batch` for chat data: whole conversations, assistant tokens as targets."""
    return rows.batch(tokens, batch_rng(config, step, micro, rank), config.batch.micro_batch)


def conversation_rows(dataset_dir: Path, meta: dict, config: TrainConfig,
                      pad_token_id: int) -> ConversationRows | None:
    """The chat sampler for a chat dataset (dataset.json's "chat"), else None."""
    chat = meta.get("chat")
    if not chat:
        return None
    index = load_document_index(dataset_dir, "train")
    mask = load_loss_mask(dataset_dir, "train")
    if index is None or mask is None:
        raise ValueError(f"{dataset_dir}: a chat dataset without its document index or loss "
                         "mask; prepare the dataset again")
    if chat["packing"] not in ("packed", "unpacked"):
        raise ValueError(f"{dataset_dir}: chat packing {chat['packing']!r} is not "
                         "'packed' or 'unpacked'")
    return ConversationRows(index.offsets, index.weights, mask, seq_len=config.batch.seq_len,
                            packed=chat["packing"] == "packed", pad_token_id=pad_token_id)


def build_model(config: TrainConfig, meta: dict, pad_token_id: int,
                device: torch.device | None = None) -> PreTrainedModel:
    """From scratch (the plan's shape, the dataset's vocabulary), or the base model in
    `model.pretrained_dir`, with LoRA adapters when `adapter.kind` is lora."""
    spec = config.model
    if spec.pretrained_dir is not None:
        base = load_pretrained(spec.pretrained_dir, config.adapter,
                               device or torch.device("cpu"))
        rows = int(base.config.vocab_size)
        if rows < meta["vocab_size"]:
            raise ValueError(f"the dataset's ids go up to {meta['vocab_size']}, the base model "
                             f"in {spec.pretrained_dir} embeds {rows}: it was not tokenized "
                             "with this base's tokenizer")
        return with_lora(base, config.adapter) if config.adapter.kind == "lora" else base
    build = {"llama": llama_config, "qwen2": qwen2_config}[spec.family]
    hf_config = build(vocab_size=meta["vocab_size"], hidden_size=spec.hidden_size,
                      num_layers=spec.num_layers, num_heads=spec.num_heads,
                      intermediate_size=spec.intermediate_size, seq_len=config.batch.seq_len,
                      eos_token_id=meta["eos_token_id"], pad_token_id=pad_token_id)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(hf_config)


PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new high-water mark at the current footprint, so that `peak_memory_bytes`
    read after the loop is the training's peak: the loaded model and what the steps
    add, not the transient copies of loading a base model, nor an earlier job of the
    same process. On the CPU, Linux's VmHWM is reset ("5" to clear_refs); where that
    is refused (another OS, a locked-down /proc), the process's lifetime peak stays."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        PROC_CLEAR_REFS.write_text("5")


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated, or the CPU's resident high-water mark (VmHWM, which
    `reset_peak_memory` resets; getrusage's ru_maxrss, which nothing resets, where
    /proc is missing)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    with contextlib.suppress(OSError, ValueError):
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Trainer:
    def __init__(self, config: TrainConfig, dataset_dir: Path, store: ArtifactStore,
                 index: CheckpointIndex, *, device: torch.device | None = None,
                 peak_flops: float = 0.0) -> None:
        self.config = config
        self.dataset_dir = dataset_dir
        self.store = store
        self.index = index
        self.rank, self.world_size = rank_and_world()
        self.device = device or torch.device("cpu")
        self.peak_flops = peak_flops
        self.meta = json.loads((dataset_dir / "dataset.json").read_text())
        self.train_tokens = load_token_stream(dataset_dir, "train")
        if len(self.train_tokens) <= config.batch.seq_len:
            raise ValueError(f"{len(self.train_tokens)} training tokens: fewer than one "
                             f"sequence of {config.batch.seq_len}")
        self.sampler = build_window_sampler(len(self.train_tokens), config.batch.seq_len,
                                            load_document_index(dataset_dir, "train"))
        if "pad_token_id" in self.meta:
            self.pad_token_id = int(self.meta["pad_token_id"])
        else:  # datasets prepared before dataset.json recorded it
            vocab = json.loads((dataset_dir / "tokenizer" / "tokenizer.json").read_text())
            self.pad_token_id = vocab["model"]["vocab"].get("<|pad|>", self.meta["eos_token_id"])
        self.conversations = conversation_rows(dataset_dir, self.meta, config,
                                               self.pad_token_id)
        torch.manual_seed(config.seed)
        model = build_model(config, self.meta, self.pad_token_id, self.device)
        self.hf_config = model.config
        self.parameters = sum(p.numel() for p in model.parameters())
        self.trainable_parameters = sum(p.numel() for p in model.parameters()
                                        if p.requires_grad)
        self.engine: Engine = build_engine(model, config, self.device)
        self.step = 0

    # -- collective helpers (no-ops on one rank) -----------------------------------

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _broadcast(self, value):
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _mean_loss_and_stops(self, loss: float, stop: bool, over_budget: bool
                             ) -> tuple[float, bool, bool]:
        """The mean loss, and whether any rank was asked to stop or ran out of budget
        (so that all of them checkpoint at the same step)."""
        if self.world_size == 1:
            return loss, stop, over_budget
        t = torch.tensor([loss, float(stop), float(over_budget)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0]) / self.world_size, bool(t[1] > 0), bool(t[2] > 0)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def micro_batch(self, step: int, micro: int) -> Batch:
        if self.conversations is not None:
            return chat_micro_batch(self.train_tokens, self.config, step, micro, self.rank,
                                    self.conversations)
        return micro_batch(self.train_tokens, self.config, step, micro, self.rank,
                           self.sampler)

    # -- calibration ------------------------------------------------------------------

    def calibrate(self, flops_per_token: float) -> tuple[float, str]:
        """Achieved FLOP/s of one device over timed passes that change nothing; (0, "")
        where the engine cannot run such a pass."""
        batch = self.micro_batch(self.step, 0)
        rng = torch.get_rng_state()
        try:
            if not self.engine.calibration_pass(batch):  # warm-up (and compile)
                return 0.0, ""
            self._synchronize()
            started = time.perf_counter()
            for _ in range(CALIBRATION_PASSES):
                self.engine.calibration_pass(batch)
            self._synchronize()
            elapsed = time.perf_counter() - started
        finally:
            torch.set_rng_state(rng)
        flops = CALIBRATION_PASSES * batch.numel() * flops_per_token / max(elapsed, 1e-9)
        return flops, (f"{CALIBRATION_PASSES} timed forward/backward passes of micro-batch "
                       f"{self.config.batch.micro_batch} before the first step")

    # -- checkpoints ----------------------------------------------------------------

    def save_checkpoint(self) -> CheckpointRef:
        work = self.store.root / "tmp" / f"ckpt-{self.index.run_id}-{self.step}"
        directory = make_checkpoint_dir(work, self.rank, self.world_size)
        with together(f"writing the checkpoint of step {self.step}", self.world_size):
            self.engine.save(work)
            torch.save({"torch_rng": torch.get_rng_state()}, work / f"rng-rank{self.rank}.pt")
            if self.rank == 0:
                (work / "trainer_state.json").write_text(json.dumps(
                    {"step": self.step, "world_size": self.world_size,
                     "engine": self.config.engine.kind}))
        stored = store_checkpoint(self.store, directory, self.rank, self.world_size)
        ref = None
        with together(f"indexing the checkpoint of step {self.step}", self.world_size):
            if self.rank == 0:
                assert stored is not None  # rank 0 stored it
                ref = CheckpointRef(self.step, stored.digest, size_bytes=stored.size_bytes)
                self.index.add(ref)
        return self._broadcast(ref)

    def try_resume(self) -> int:
        found = None
        with together("finding the latest checkpoint", self.world_size):
            if self.rank == 0:
                latest = self.index.latest_good()
                if latest is not None:
                    found = (latest[0].step, latest[0].digest)
        found = self._broadcast(found)
        if found is None:
            return 0
        step, digest = found
        path = checkpoint_on_this_node(self.store, digest, self.world_size)
        state = json.loads((path / "trainer_state.json").read_text())
        if state["world_size"] != self.world_size or state["engine"] != self.config.engine.kind:
            raise ValueError(
                f"checkpoint at step {step} was written by {state['world_size']} "
                f"{state['engine']} rank(s); this job runs {self.world_size} "
                f"{self.config.engine.kind} rank(s)")
        self.engine.load(path)
        torch.set_rng_state(torch.load(path / f"rng-rank{self.rank}.pt",
                                       weights_only=True)["torch_rng"])
        self.step = step
        return step

    # -- the loop -----------------------------------------------------------------

    def run(self, *, stop: threading.Event | None = None,
            on_progress: Callable[[Progress], None] | None = None,
            on_checkpoint: Callable[[CheckpointRef], None] | None = None,
            progress_every_s: float = 1.0) -> TrainResult:
        config = self.config
        max_steps = config.schedule.max_steps
        started = time.perf_counter()
        resumed_from = self.try_resume()
        reset_peak_memory(self.device)
        losses: list[float] = []
        tokens_per_step = (config.batch.micro_batch * config.batch.seq_len
                           * config.batch.grad_accum * self.world_size)
        flops_per_token = training_flops_per_token(
            self.parameters, self.hf_config.num_hidden_layers, self.hf_config.hidden_size,
            config.batch.seq_len)
        measured_flops, calibration = self.calibrate(flops_per_token)
        # Without a pass outside a step (DeepSpeed), the steps after the first are timed.
        timed_from = (self.step + 1, 0.0) if not measured_flops else None
        budget = config.schedule.time_budget_s
        interval, last_checkpoint, step_seconds = config.checkpoint.interval, self.step, 0.0
        stopped_at_budget = False
        last_report, window_tokens, window_start = 0.0, 0, time.perf_counter()
        while self.step < max_steps:
            step_started = time.perf_counter()
            batches = [self.micro_batch(self.step, m) for m in range(config.batch.grad_accum)]
            loss = self.engine.train_step(batches)
            self.step += 1
            now = time.perf_counter()
            over_budget = bool(budget) and now - started >= budget and self.step < max_steps
            loss, stopping, over_budget = self._mean_loss_and_stops(
                loss, stop is not None and stop.is_set(), over_budget)
            losses.append(loss)
            step_seconds = now - step_started if not step_seconds else (
                0.8 * step_seconds + 0.2 * (now - step_started))
            window_tokens += tokens_per_step
            if timed_from is not None and self.step == timed_from[0]:
                self._synchronize()
                timed_from = (self.step, time.perf_counter())
            elif timed_from is not None and self.step == timed_from[0] + CALIBRATION_PASSES:
                self._synchronize()
                elapsed = time.perf_counter() - timed_from[1]
                measured_flops = (CALIBRATION_PASSES * tokens_per_step / self.world_size
                                  * flops_per_token / max(elapsed, 1e-9))
                calibration = (f"training steps {timed_from[0] + 1}-{self.step} timed (the "
                               f"{config.engine.kind} engine runs no pass outside a step)")
                timed_from = None
            if self.rank == 0 and on_progress and (
                    now - last_report >= progress_every_s or self.step == max_steps
                    or (measured_flops and calibration)):
                rate = window_tokens / max(now - window_start, 1e-9)
                on_progress(Progress(
                    self.step, max_steps, loss, self.engine.learning_rate(), rate,
                    (max_steps - self.step) * tokens_per_step / max(rate, 1e-9),
                    rate * flops_per_token / self.peak_flops if self.peak_flops else 0.0,
                    measured_flops, calibration))
                measured_flops, calibration = 0.0, ""  # reported once
                last_report, window_tokens, window_start = now, 0, now
            if stopping or over_budget or (self.step - last_checkpoint >= interval
                                           and self.step < max_steps):
                checkpoint_started = time.perf_counter()
                ref = self.save_checkpoint()
                cost = time.perf_counter() - checkpoint_started
                last_checkpoint = self.step
                if config.checkpoint.preemptions_per_hour > 0:
                    # Rank 0's measurement decides, so every rank checkpoints together.
                    interval = self._broadcast(checkpoint_interval_steps(
                        step_seconds=step_seconds, total_steps=max_steps,
                        checkpoint_cost_s=cost,
                        preemptions_per_hour=config.checkpoint.preemptions_per_hour))
                ref = replace(ref, seconds=cost, next_interval=interval)
                if self.rank == 0 and on_checkpoint:
                    on_checkpoint(ref)
                if stopping:
                    return TrainResult(preempted=True, step=self.step, checkpoint=ref,
                                       resumed_from_step=resumed_from, losses=losses,
                                       parameters=self.parameters, planned_steps=max_steps)
                if over_budget:
                    log.warning("time budget of %.0f s reached at step %d of %d: "
                                "checkpointed, stopping there", budget, self.step, max_steps)
                    stopped_at_budget = True
                    break
        # Read before the export: merging LoRA loads a second copy of the base, which is
        # not training memory (the process's peak, export included, is getrusage's).
        training_peak = peak_memory_bytes(self.device)
        state = self.engine.export_state_dict()  # collective under ZeRO-3
        result = TrainResult(
            preempted=False, step=self.step, final_loss=losses[-1] if losses else float("nan"),
            train_tokens=(self.step - resumed_from) * tokens_per_step,
            parameters=self.parameters, resumed_from_step=resumed_from, losses=losses,
            peak_memory_bytes=training_peak,
            stopped_at_budget=stopped_at_budget, planned_steps=max_steps)
        result.trainable_parameters = self.trainable_parameters
        if self.rank == 0:
            assert state is not None, "rank 0 holds the consolidated weights"
            out = self.store.scratch_dir("model-")
            model = self._export_model(state, out)
            heldout = load_token_stream(self.dataset_dir, "heldout")
            result.heldout_perplexity = perplexity(model, heldout, seq_len=config.batch.seq_len)
            if self.conversations is not None:
                result.assistant_perplexity = self.heldout_assistant_perplexity(model, heldout)
            if (self.dataset_dir / EVAL_SET).is_file():
                result.task_eval = evaluate_task(
                    model, load_tokenizer(self.dataset_dir / "tokenizer"),
                    read_eval_set(self.dataset_dir / EVAL_SET))
            result.model_dir = self._save_hf(model, out)
        result.wall_seconds = time.perf_counter() - started
        self._barrier()
        return result

    def heldout_assistant_perplexity(self, model: PreTrainedModel, heldout: np.ndarray
                                     ) -> float:
        index = load_document_index(self.dataset_dir, "heldout")
        mask = load_loss_mask(self.dataset_dir, "heldout")
        if index is None or mask is None:
            raise ValueError(f"{self.dataset_dir}: held-out chat data without its document "
                             "index or loss mask; prepare the dataset again")
        return assistant_perplexity(model, heldout, mask, index.offsets,
                                    seq_len=self.config.batch.seq_len)

    def _export_model(self, state: dict[str, torch.Tensor], out: Path) -> PreTrainedModel:
        """The trained weights as a plain transformers model; LoRA's adapter is merged into
        the base, and also saved alone under `out/adapter`."""
        from transformers import AutoModelForCausalLM

        base_dir = self.config.model.pretrained_dir
        if self.config.adapter.kind == "lora":
            assert base_dir is not None, "LoRA adapts a base model"
            return merged_and_adapter(base_dir, self.config.adapter, state, out)
        model: PreTrainedModel = AutoModelForCausalLM.from_config(self.hf_config)
        model.load_state_dict(state)
        return model.eval()

    def _save_hf(self, model: PreTrainedModel, out: Path) -> Path:
        """A Hugging Face directory: config, safetensors, tokenizer (the dataset's: a base
        model's own), generation config (a base model's own, else sampling defaults)."""
        from transformers import GenerationConfig

        model.save_pretrained(str(out), safe_serialization=True)
        for item in (self.dataset_dir / "tokenizer").iterdir():
            shutil.copy2(item, out / item.name)
        base_dir = self.config.model.pretrained_dir
        if base_dir is not None and (base_dir / GENERATION_CONFIG).is_file():
            shutil.copy2(base_dir / GENERATION_CONFIG, out / GENERATION_CONFIG)
            return out
        GenerationConfig(
            bos_token_id=self.hf_config.bos_token_id, eos_token_id=self.hf_config.eos_token_id,
            pad_token_id=self.hf_config.pad_token_id, do_sample=True, temperature=0.8,
            top_p=0.95, max_new_tokens=64,
        ).save_pretrained(str(out))
        return out
