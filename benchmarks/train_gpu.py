"""Training MFU on one GPU: plain (eager, compiled) and DeepSpeed ZeRO-2/3.

For Llama models of 124M, 350M and 1B parameters (`TrainConfig.from_preset`,
the sizes the scheduler plans; vocabulary 32000, sequence 2048), each engine of
services/trainer/engines.py trains on random tokens; after warm-up (compilation
included there) the timed steps give tokens/s and

    MFU = tokens/s × (6·N + 12·L·H·T) / peak,   peak = 989 TFLOP/s (H100/H200 dense bf16).

Precision is bf16 (autocast over fp32 master weights for the plain engine;
DeepSpeed's bf16 mode with fp32 master weights in the optimizer). Results are
written after every configuration, so a run cut short still reports.

    python benchmarks/train_gpu.py [--sizes 1b,350m,124m] [--modes eager,compiled,zero2,zero3]
        [--out results.json] [--steps 10]

Targets: >= 50% at 1B and >= 45% at 350M for the best plain mode; DeepSpeed
>= 0.8x the plain path on one GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import time
from pathlib import Path

import torch

from lmforge.modeling import llama_config, training_flops_per_token
from services.trainer.config import TrainConfig
from services.trainer.engines import build_engine

PEAK_FLOPS = 989e12
MICRO_BATCH = {"1b": 8, "350m": 16, "124m": 16, "tiny": 4, "small": 4}


def init_single_rank() -> None:
    """DeepSpeed wants a process group even on one GPU (else it reaches for mpi4py)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def measure(size: str, mode: str, *, device: torch.device, seq_len: int, vocab: int,
            steps: int, warmup: int, micro_batch: int = 0) -> dict:
    micro = micro_batch or MICRO_BATCH.get(size, 8)
    config = TrainConfig.from_preset(
        size, seq_len=seq_len, micro_batch=micro, max_steps=10_000, warmup_steps=10,
        engine_kind="deepspeed" if mode.startswith("zero") else "plain", precision="bf16",
        zero_stage=int(mode[4]) if mode.startswith("zero") else 0,
        compile=mode.endswith("compiled"))
    if config.engine.kind == "deepspeed":
        init_single_rank()
    from transformers import AutoModelForCausalLM

    spec = config.model
    hf_config = llama_config(vocab_size=vocab, hidden_size=spec.hidden_size,
                             num_layers=spec.num_layers, num_heads=spec.num_heads,
                             intermediate_size=spec.intermediate_size, seq_len=seq_len,
                             eos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    parameters = sum(p.numel() for p in model.parameters())
    engine = build_engine(model, config, device)
    batch = torch.randint(0, vocab, (micro, seq_len), device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    for _ in range(warmup):
        engine.train_step([batch])
    sync()
    warm_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = engine.train_step([batch])
    sync()
    elapsed = time.perf_counter() - t0
    tokens_per_s = steps * micro * seq_len / elapsed
    flops = training_flops_per_token(parameters, spec.num_layers, spec.hidden_size, seq_len)
    result = {
        "size": size, "mode": mode, "parameters": parameters, "micro_batch": micro,
        "seq_len": seq_len, "tokens_per_s": round(tokens_per_s, 1),
        "step_ms": round(1e3 * elapsed / steps, 2), "warmup_s": round(warm_s, 1),
        "mfu": round(tokens_per_s * flops / PEAK_FLOPS, 4), "loss": round(loss, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if device.type == "cuda" else None,
    }
    del engine, model, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1b,350m,124m")
    parser.add_argument("--modes", default="eager,compiled,zero2,zero3",
                        help="eager, compiled, zero2, zero3, zero2-compiled, zero3-compiled")
    parser.add_argument("--micro-batch", default="",
                        help="per size, e.g. 1b=16,350m=32 (default: 1b=8, others 16)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("train_gpu.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"benchmark": "train_gpu", "device": torch.cuda.get_device_name()
              if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "peak_flops": PEAK_FLOPS, "results": []}
    micro = {k: int(v) for k, _, v in (i.partition("=") for i in args.micro_batch.split(",")
                                          if i)}
    for size in args.sizes.split(","):
        for mode in args.modes.split(","):
            try:
                result = measure(size, mode, device=device, seq_len=args.seq_len,
                                 vocab=args.vocab, steps=args.steps, warmup=args.warmup,
                                 micro_batch=micro.get(size, 0))
            except Exception as exc:  # record and go on: one failure must not hide the rest
                result = {"size": size, "mode": mode, "error": f"{type(exc).__name__}: {exc}"}
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            report["results"].append(result)
            print(json.dumps(result), flush=True)
            args.out.write_text(json.dumps(report, indent=1))
    by = {(r["size"], r["mode"]): r.get("mfu", 0.0) for r in report["results"]}
    summary = {}
    for size in args.sizes.split(","):
        plain = max((v for (s, m), v in by.items() if s == size and not m.startswith("zero")),
                    default=0.0)
        ds = max((v for (s, m), v in by.items() if s == size and m.startswith("zero")),
                 default=0.0)
        summary[size] = {"best_plain_mfu": plain, "best_deepspeed_mfu": ds,
                         "deepspeed_vs_plain": round(ds / plain, 3) if plain else None}
    report["summary"] = summary
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
