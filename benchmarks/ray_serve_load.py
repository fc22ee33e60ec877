"""The same load against Ray Serve with @serve.batch, serving the same model.

The baseline a team would otherwise deploy: a Ray Serve deployment whose
`@serve.batch` handler runs Hugging Face `generate` (left-padded static batches,
sampling at temperature 1, 32 new tokens) behind Ray's HTTP proxy. 64 clients
for 30 s each, against it and then against lmforge's gateway (continuous
batching, gRPC streaming), same model, same prompts, in this one run.

    pip install "ray[serve]"      # optional benchmark dependency
    python -m benchmarks.ray_serve_load [--clients 64] [--seconds 30]   # from the repo root

Prints JSON. Target: >= 2x Ray Serve's requests/s at no more than half its p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from benchmarks.gateway_load import PROMPTS, build_model, run_config, summarize


def ray_serve(model_dir: Path, port: int, max_batch: int, threads: int) -> None:
    import ray
    from ray import serve
    from starlette.requests import Request

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment(max_ongoing_requests=256)
    class Generator:
        def __init__(self, directory: str) -> None:
            import torch
            from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

            torch.set_num_threads(threads)
            self.torch = torch
            self.tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
            self.tokenizer.padding_side = "left"
            self.model = AutoModelForCausalLM.from_pretrained(directory).eval()

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=0.01)
        async def generate(self, prompts: list[str]) -> list[dict]:
            batch = self.tokenizer(prompts, return_tensors="pt", padding=True,
                                   add_special_tokens=False)
            with self.torch.inference_mode():
                out = self.model.generate(**batch, max_new_tokens=32, do_sample=True,
                                          temperature=1.0, top_p=1.0,
                                          pad_token_id=self.tokenizer.pad_token_id)
            new = out[:, batch["input_ids"].shape[1]:]
            return [{"text": self.tokenizer.decode(row, skip_special_tokens=True),
                     "tokens": int((row != self.tokenizer.pad_token_id).sum())} for row in new]

        async def __call__(self, request: Request) -> dict:
            return await self.generate((await request.json())["prompt"])

    serve.run(Generator.bind(str(model_dir)), route_prefix="/generate")


async def http_load(port: int, clients: int, seconds: float) -> dict:
    import aiohttp

    latencies, tokens, errors = [], 0, 0
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession() as session:

        async def client(index: int) -> None:
            nonlocal tokens, errors
            n = 0
            while time.perf_counter() < deadline:
                n += 1
                start = time.perf_counter()
                try:
                    async with session.post(f"http://127.0.0.1:{port}/generate",
                                            json={"prompt": PROMPTS[(index + n) % len(PROMPTS)]},
                                            timeout=aiohttp.ClientTimeout(total=120)) as r:
                        body = await r.json()
                        if r.status != 200:
                            errors += 1
                            continue
                except (TimeoutError, aiohttp.ClientError):
                    errors += 1
                    continue
                end = time.perf_counter()
                if end <= deadline:
                    latencies.append(end - start)
                    tokens += body["tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = min(time.perf_counter(), deadline) - started
    return summarize(latencies, tokens, errors, elapsed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--ray-threads", type=int, default=0,
                        help="torch threads in Ray's replica (default: the gateway's own rule, "
                        "all cores but one; with OMP_WAIT_POLICY=PASSIVE two threads made "
                        "Ray 2-4x slower here)")
    parser.set_defaults(device="cpu")  # run_config serves on this device
    args = parser.parse_args()
    from lmforge.runtime.nats_server import free_port
    from services.inference_gateway.engines.base import default_threads

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp))
        ours = run_config(model_dir, True, args)
        port = free_port()
        ray_serve(model_dir, port, args.max_batch, args.ray_threads or default_threads())
        asyncio.run(http_load(port, 8, 5))  # warm-up: first batches compile nothing, but load
        ray = asyncio.run(http_load(port, args.clients, args.seconds))
        import ray as ray_module
        from ray import serve

        serve.shutdown()
        ray_module.shutdown()
    report = {
        "benchmark": "ray_serve_load", "clients": args.clients, "seconds": args.seconds,
        "max_new_tokens": 32, "ray_threads": args.ray_threads or default_threads(),
        "lmforge_gateway": ours, "ray_serve_batch": ray,
        "requests_ratio": round(ours["requests_per_s"] / max(ray["requests_per_s"], 1e-9), 2),
        "p99_ratio": round(ours["e2e_p99_ms"] / max(ray["e2e_p99_ms"], 1e-9), 2),
        "target": "requests_ratio >= 2 and p99_ratio <= 0.5",
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
