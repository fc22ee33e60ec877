"""Training throughput on the CPU: lmforge's trainer against the Hugging Face Trainer.

Same model (a Llama from the trainer's preset: `TrainConfig.from_preset`, the
config the service runs), same optimizer settings, same packed data (the shipped
fortunes sample, tokenized by data-prep's own code), same micro-batch, sequence
length and precision, both timed after warm-up, in one process so the ratio is
fair. Also peak RSS growth with and without gradient checkpointing at the same
batch, each measured in a fresh child process.

    python benchmarks/train_cpu.py [--preset small] [--steps 30] [--warmup 5]

Prints JSON. Target: tokens/s ratio >= 1.5; checkpointed activation memory <= 0.5x.
Also prints the machine's measured fp32 matmul rate, the ceiling for both trainers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from lmforge.artifacts import ArtifactStore
from services.data_prep.prepare import PrepConfig, prepare_dataset
from services.trainer.checkpoints import CheckpointIndex
from services.trainer.config import PRESETS, TrainConfig
from services.trainer.training import Trainer, micro_batch

ROOT = Path(__file__).resolve().parents[1]


def make_config(args, *, compile: bool, checkpointing: bool = False, steps: int) -> TrainConfig:
    """The trainer's own preset, as the service would build it, at the benchmark's batch."""
    return TrainConfig.from_preset(
        args.preset, seq_len=args.seq_len, micro_batch=args.batch, max_steps=steps,
        warmup_steps=1, checkpoint_interval=10**9, precision=args.precision, compile=compile,
        gradient_checkpointing=checkpointing)


def time_ours(args, dataset: Path, store: ArtifactStore, *, compile: bool) -> dict:
    config = make_config(args, compile=compile, steps=args.warmup + args.steps)
    trainer = Trainer(config, dataset, store, CheckpointIndex(store.root / "ck", "b", store))
    engine = trainer.engine
    tokens = trainer.train_tokens
    for step in range(args.warmup):
        engine.train_step([micro_batch(tokens, config, step, 0, 0)])
    start = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        engine.train_step([micro_batch(tokens, config, step, 0, 0)])
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": args.steps * args.batch * args.seq_len / elapsed,
            "step_ms": 1e3 * elapsed / args.steps,
            "parameters": sum(p.numel() for p in engine.model.parameters())}


def time_hf_trainer(args, dataset: Path, store: ArtifactStore) -> dict:
    from transformers import Trainer as HFTrainer
    from transformers import TrainerCallback, TrainingArguments

    config = make_config(args, compile=False, steps=args.warmup + args.steps)
    ours = Trainer(config, dataset, store, CheckpointIndex(store.root / "ck2", "b", store))
    model = ours.engine.model  # the same architecture and initial weights
    tokens = ours.train_tokens
    n = (args.warmup + args.steps) * args.batch
    windows = torch.stack([micro_batch(tokens, config, i, 0, 0)[0] for i in range(n)])

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(windows)

        def __getitem__(self, i):
            return {"input_ids": windows[i], "labels": windows[i]}

    class Clock(TrainerCallback):
        def __init__(self):
            self.start = None
            self.end = None

        def on_step_end(self, targs, state, control, **kw):
            if state.global_step == args.warmup:
                self.start = time.perf_counter()
            if state.global_step == args.warmup + args.steps:
                self.end = time.perf_counter()

    clock = Clock()
    opt = config.optimizer
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch,
            max_steps=args.warmup + args.steps, learning_rate=opt.learning_rate,
            weight_decay=opt.weight_decay, adam_beta1=opt.betas[0], adam_beta2=opt.betas[1],
            adam_epsilon=opt.eps, max_grad_norm=opt.grad_clip, lr_scheduler_type="cosine",
            warmup_steps=config.schedule.warmup_steps, logging_strategy="no",
            save_strategy="no", report_to=[],
            bf16=args.precision == "bf16", use_cpu=True, dataloader_num_workers=0,
            optim="adamw_torch", disable_tqdm=True)
        HFTrainer(model=model, args=targs, train_dataset=Windows(),
                  callbacks=[clock]).train()
    elapsed = clock.end - clock.start
    return {"tokens_per_s": args.steps * args.batch * args.seq_len / elapsed,
            "step_ms": 1e3 * elapsed / args.steps}


def _memory_child(args, dataset: str, store_root: str, checkpointing: bool, queue) -> None:
    store = ArtifactStore(Path(store_root))
    config = make_config(args, compile=False, checkpointing=checkpointing, steps=3)
    trainer = Trainer(config, Path(dataset), store,
                      CheckpointIndex(store.root / f"ck{checkpointing}", "m", store))
    # One step first, so gradients and optimizer state exist; then reset the kernel's
    # high-water mark (clear_refs 5) and measure how far the next steps push RSS.
    trainer.engine.train_step([micro_batch(trainer.train_tokens, config, 0, 0, 0)])
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    for step in range(1, 3):
        trainer.engine.train_step([micro_batch(trainer.train_tokens, config, step, 0, 0)])
    queue.put({"rss_before_mib": round(before / 1024, 1),
               "step_peak_growth_mib": round((_status_kib("VmHWM") - before) / 1024, 1),
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                     1)})


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_memory(args, dataset: Path, store: ArtifactStore, checkpointing: bool) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_memory_child, args=(args, str(dataset), str(store.root),
                                                    checkpointing, queue))
    child.start()
    result = queue.get(timeout=600)
    child.join()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--memory-batch", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(Path(tmp) / "store")
        prepare_dataset(ROOT / "tests/data/fortunes-sample.txt", "text", "", Path(tmp) / "ds",
                        PrepConfig(vocab_size=4096, seq_len=args.seq_len))
        dataset = Path(tmp) / "ds"
        hf = time_hf_trainer(args, dataset, store)
        plain = time_ours(args, dataset, store, compile=False)
        compiled = time_ours(args, dataset, store, compile=True)
        # Activation memory = how far a training step pushes RSS above where it starts
        # (weights, gradients and optimizer state are already there).
        memory_args = argparse.Namespace(**{**vars(args), "batch": args.memory_batch})
        full = measure_memory(memory_args, dataset, store, checkpointing=False)
        ckpt = measure_memory(memory_args, dataset, store, checkpointing=True)
    best = max(plain["tokens_per_s"], compiled["tokens_per_s"])
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    matmul_gflops = 10 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9
    p = PRESETS[args.preset]
    from lmforge.modeling import training_flops_per_token

    flops = training_flops_per_token(plain["parameters"], p.num_layers, p.hidden_size,
                                     args.seq_len)
    report = {
        "benchmark": "train_cpu", "preset": args.preset, "batch": args.batch,
        "seq_len": args.seq_len, "precision": args.precision, "threads": torch.get_num_threads(),
        "hf_trainer": hf, "lmforge_plain": plain, "lmforge_compiled": compiled,
        "ratio_plain_vs_hf": round(plain["tokens_per_s"] / hf["tokens_per_s"], 3),
        "ratio_compiled_vs_hf": round(compiled["tokens_per_s"] / hf["tokens_per_s"], 3),
        "ratio_best_vs_hf": round(best / hf["tokens_per_s"], 3), "target_ratio": 1.5,
        "matmul_gflops": round(matmul_gflops, 1),
        "hf_share_of_matmul_rate": round(hf["tokens_per_s"] * flops / 1e9 / matmul_gflops, 3),
        "best_share_of_matmul_rate": round(best * flops / 1e9 / matmul_gflops, 3),
        "memory_batch": args.memory_batch,
        "memory_without_checkpointing": full, "memory_with_checkpointing": ckpt,
        "activation_memory_ratio": round(
            ckpt["step_peak_growth_mib"] / full["step_peak_growth_mib"], 3),
        "target_activation_ratio": 0.5,
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
