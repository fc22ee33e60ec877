"""Gateway throughput under load: continuous batching on vs off, same model.

A gateway process (the real GatewayServer, Generate over gRPC on 127.0.0.1)
serves the demo-size Llama (the `tiny` preset, tokenizer trained on the
shipped corpus, weights initialised from config); this process runs N
concurrent streaming clients for D seconds against it, first with continuous
batching, then with one request per slot. Each request asks for 32 new tokens
at temperature 1 with its own seed, so both runs do the same work.
Also the gateway's overhead: batch-1 latency of a 1-token request minus the
same forward pass in-process.

    python benchmarks/gateway_load.py [--clients 64] [--seconds 30]

Then overload: 8x the clients against the default queue (64): the excess must be
refused at once (RESOURCE_EXHAUSTED) and peak memory (gateway + engine process,
VmHWM) must stay where it was under the normal load.

Prints JSON. Target: requests/s with batching >= 5x without.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The secret of life is", "Computers are", "A fortune for you:", "Never trust",
           "The best way to predict the future", "Q: What is love? A:"]


def build_model(directory: Path, preset: str = "tiny") -> Path:
    from transformers import AutoModelForCausalLM

    from lmforge.modeling import llama_config
    from lmforge.presets import PRESETS
    from services.data_prep.prepare import PrepConfig, prepare_dataset

    prepare_dataset(ROOT / "tests/data/fortunes-sample.txt", "text", "", directory / "ds",
                    PrepConfig(vocab_size=4096, seq_len=128))
    meta = json.loads((directory / "ds" / "dataset.json").read_text())
    p = PRESETS[preset]
    import torch

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(
        vocab_size=meta["vocab_size"], hidden_size=p.hidden_size, num_layers=p.num_layers,
        num_heads=p.num_heads, intermediate_size=p.intermediate_size, seq_len=128,
        eos_token_id=meta["eos_token_id"], pad_token_id=meta["eos_token_id"]))
    out = directory / "model"
    model.save_pretrained(str(out))
    for item in (directory / "ds" / "tokenizer").iterdir():
        (out / item.name).write_bytes(item.read_bytes())
    return out


def serve(model_dir: str, batching: bool, max_batch: int, max_queue: int, device: str,
          port_queue) -> None:
    import torch

    from services.inference_gateway.api.server import GatewayServer
    from services.inference_gateway.engines.base import default_threads
    from services.inference_gateway.engines.process import EngineProcess
    from services.inference_gateway.engines.torch import TorchEngine
    from services.inference_gateway.frontend import GenerationFrontend, Limits
    from services.inference_gateway.registry import ModelRegistry

    torch.set_num_threads(default_threads())  # as the gateway service sets it

    async def main() -> None:
        # As the gateway service builds them: batching decodes in its own process.
        engine = (EngineProcess(Path(model_dir), version="bench", max_batch=max_batch,
                                device=device)
                  if batching else TorchEngine(Path(model_dir), version="bench",
                                               device=device))
        registry = ModelRegistry()
        registry.install("bench", engine)
        frontend = GenerationFrontend(registry, Limits(
            max_new_tokens=64, max_concurrency=max_batch if batching else 4, max_queue=max_queue,
            max_prompt_chars=10_000))
        server = GatewayServer(frontend, host="127.0.0.1", port=0, max_message_bytes=1 << 20)
        await server.start()
        await server.set_serving(True)
        port_queue.put(server.port)
        await asyncio.Event().wait()

    asyncio.run(main())


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def ms(seconds: float | None, digits: int = 1) -> float | None:
    return None if seconds is None else round(1e3 * seconds, digits)


def summarize(latencies: list[float], tokens: int, errors: int, elapsed: float,
              ttfts: list[float] | None = None) -> dict:
    """The figures both load benchmarks report, from what the clients recorded (None where
    no request finished)."""
    result = {"requests": len(latencies), "errors": errors,
              "requests_per_s": round(len(latencies) / elapsed, 2),
              "generated_tokens_per_s": round(tokens / elapsed, 1)}
    if ttfts is not None:
        result["ttft_p50_ms"] = ms(percentile(ttfts, 0.5))
        result["ttft_p99_ms"] = ms(percentile(ttfts, 0.99))
    result["e2e_p50_ms"] = ms(percentile(latencies, 0.5))
    result["e2e_p99_ms"] = ms(percentile(latencies, 0.99))
    return result


async def load(port: int, clients: int, seconds: float, *, backoff_s: float = 0.05) -> dict:
    """`clients` streaming clients, each sending its next request when the last ends (or
    `backoff_s` after a RESOURCE_EXHAUSTED refusal), for `seconds`."""
    import grpc

    from lmforge.contracts.v1 import generate_pb2, generate_pb2_grpc

    latencies, ttfts, refusals, tokens, errors = [], [], [], 0, 0
    deadline = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)

        async def client(index: int) -> None:
            nonlocal tokens, errors
            n = 0
            while time.perf_counter() < deadline:
                n += 1
                request = generate_pb2.GenerateRequest(
                    model="bench", prompt=PROMPTS[(index + n) % len(PROMPTS)],
                    max_new_tokens=32, temperature=1.0, seed=index * 100_000 + n)
                start = time.perf_counter()
                first = None
                try:
                    async for piece in stub.Generate(request, timeout=120):
                        first = first or time.perf_counter()
                        if piece.finish_reason:
                            tokens += piece.completion_tokens
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        errors += 1
                        continue
                    refusals.append(time.perf_counter() - start)
                    await asyncio.sleep(backoff_s)
                    continue
                end = time.perf_counter()
                if end <= deadline:
                    latencies.append(end - start)
                    ttfts.append((first or end) - start)

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = min(time.perf_counter(), deadline) - started
    result = summarize(latencies, tokens, errors, elapsed, ttfts)
    if refusals:
        result["refused"] = len(refusals)
        result["refusal_p50_ms"] = ms(percentile(refusals, 0.5), 2)
        result["refusal_p99_ms"] = ms(percentile(refusals, 0.99), 2)
    return result


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory (VmHWM) of a process and its children (the engine process)."""
    pids = [pid] + [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                    for c in (task / "children").read_text().split()]
    total_kib = 0
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total_kib += int(line.split()[1])
    return round(total_kib / 1024, 1)


async def overhead(port: int, model_dir: Path, rounds: int, device: str = "cpu") -> dict:
    """Batch-1 latency of a 1-token request through the idle gateway, against the same
    model's forward pass run in this process, interleaved round by round so that both
    see the same machine (the forward pass alone moves by +-50 % between minutes here)."""
    import grpc
    import torch

    from lmforge.contracts.v1 import generate_pb2, generate_pb2_grpc
    from services.inference_gateway.engines.base import default_threads
    from services.inference_gateway.engines.torch import TorchEngine

    torch.set_num_threads(default_threads())
    engine = TorchEngine(model_dir, version="local", device=device)
    ids = torch.tensor([engine.encode_prompt(PROMPTS[0]).token_ids], device=device)
    request = generate_pb2.GenerateRequest(model="bench", prompt=PROMPTS[0], max_new_tokens=1)
    gateway, local = [], []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        for _ in range(rounds):
            start = time.perf_counter()
            with torch.inference_mode():
                engine.model(input_ids=ids, use_cache=True).logits[0, -1].cpu()
            local.append(time.perf_counter() - start)
            start = time.perf_counter()
            async for _ in stub.Generate(request):
                pass
            gateway.append(time.perf_counter() - start)
    gateway, local = gateway[rounds // 10:], local[rounds // 10:]  # drop the warm-up
    return {"gateway_1_token_p50_ms": round(1e3 * statistics.median(gateway), 3),
            "in_process_forward_p50_ms": round(1e3 * statistics.median(local), 3),
            "overhead_p50_ms": round(1e3 * statistics.median(
                g - f for g, f in zip(gateway, local, strict=True)), 3),
            "target_ms": 1.0}


def run_config(model_dir: Path, batching: bool, args, *, clients: int | None = None,
               seconds: float | None = None, max_queue: int = 1024,
               measure_overhead: bool = True) -> dict:
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    # Not a daemon: the gateway starts its engine process (killed below all the same).
    server = ctx.Process(target=serve, args=(str(model_dir), batching, args.max_batch,
                                             max_queue, args.device, ports))
    server.start()
    try:
        port = ports.get(timeout=120)
        # Overhead first, on an idle server: one 1-token request at a time.
        idle = (asyncio.run(overhead(port, model_dir, 300, args.device))
                if measure_overhead else None)
        result = asyncio.run(load(port, clients or args.clients, seconds or args.seconds))
        result["peak_rss_mib"] = peak_rss_mib(server.pid)
        if idle:
            result["overhead"] = idle
        return result
    finally:
        server.kill()
        server.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--preset", default="tiny", help="model size (scheduler presets)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp), args.preset)
        on = run_config(model_dir, True, args)
        off = run_config(model_dir, False, args)
        # Overload: 8x the clients against the service's default queue (64 waiting):
        # the excess is refused at once and memory stays where it was at 64 clients.
        overload = run_config(model_dir, True, args, clients=8 * args.clients, seconds=10,
                              max_queue=64, measure_overhead=False)
    report = {
        "benchmark": "gateway_load", "model": f"{args.preset} preset (Llama, vocab 4096)",
        "device": args.device,
        "clients": args.clients, "seconds": args.seconds, "max_new_tokens": 32,
        "batching_on": {k: v for k, v in on.items() if k != "overhead"},
        "batching_off": {k: v for k, v in off.items() if k != "overhead"},
        "throughput_ratio": round(on["requests_per_s"] / max(off["requests_per_s"], 1e-9), 2),
        "target_ratio": 5.0,
        "overhead_batching_on": on["overhead"],
        "overhead_batching_off": off["overhead"],
        "overload": {"clients": 8 * args.clients, "seconds": 10, "max_queue": 64, **overload,
                     "peak_rss_ratio_vs_64_clients": round(
                         overload["peak_rss_mib"] / on["peak_rss_mib"], 2)},
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
