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

The cost of security, `--security`: two gateways on the same model at once, one
open (plaintext, no keys) and one as a secured deployment runs it (TLS on the
port with a CA-signed certificate, an API key required on every call, checked
against its salted hash and its token bucket, the tenant set for the registry).
The same load alternates between them, round by round and in swapped order, so
both see the same machine; requests/s and p99 are the medians over the rounds.

    python benchmarks/gateway_load.py --security [--clients 64] [--seconds 10] [--rounds 3]

Target: secured throughput at most 5 % below open.
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
from dataclasses import dataclass
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
          port_queue, secured: tuple[str, str, str] | None = None) -> None:
    """`secured`: (certificate PEM path, key PEM path, the API key's record as JSON): serve
    TLS and require that key, as the gateway service does with keys and TLS configured."""
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
        interceptors, credentials = [], None
        if secured is not None:
            import grpc

            from lmforge.security.api_keys import ApiKeyRecord
            from services.inference_gateway.access import AccessControl
            from services.inference_gateway.api.guard import RequireApiKey

            cert, key, record_json = secured
            record = ApiKeyRecord.decode(record_json.encode())
            access = AccessControl(None, rate_per_s=1e9, burst=10**9)
            access.use({record.key_id: record})
            interceptors = [RequireApiKey(access)]
            credentials = grpc.ssl_server_credentials(
                [(Path(key).read_bytes(), Path(cert).read_bytes())])
        server = GatewayServer(frontend, host="127.0.0.1", port=0, max_message_bytes=1 << 20,
                               interceptors=interceptors, credentials=credentials)
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


@dataclass(frozen=True)
class ClientSecurity:
    """How a secured gateway's client connects: the CA it verifies the server against and
    the API key it sends (`authorization: Bearer …`)."""

    ca_pem: bytes
    api_key: str

    def channel(self, port: int):  # -> grpc.aio.Channel
        import grpc

        return grpc.aio.secure_channel(f"localhost:{port}",
                                       grpc.ssl_channel_credentials(self.ca_pem))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),)


async def load(port: int, clients: int, seconds: float, *, backoff_s: float = 0.05,
               security: ClientSecurity | None = None) -> dict:
    """`clients` streaming clients, each sending its next request when the last ends (or
    `backoff_s` after a RESOURCE_EXHAUSTED refusal), for `seconds`; over TLS with an API
    key when `security` says how."""
    import grpc

    from lmforge.contracts.v1 import generate_pb2, generate_pb2_grpc

    latencies, ttfts, refusals, tokens, errors = [], [], [], 0, 0
    deadline = time.perf_counter() + seconds
    metadata = security.metadata if security else None
    channel_cm = (security.channel(port) if security
                  else grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
    async with channel_cm as channel:
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
                    async for piece in stub.Generate(request, timeout=120, metadata=metadata):
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


async def paired_latency(ports: dict[str, int], security: dict[str, ClientSecurity | None],
                         rounds: int) -> dict:
    """One 1-token request at a time, alternating between the gateways: the per-request
    cost of TLS and the key check, paired request by request so that the machine's drift
    (the load tests above move by +-25 % between rounds here) cancels."""
    import grpc

    from lmforge.contracts.v1 import generate_pb2, generate_pb2_grpc

    request = generate_pb2.GenerateRequest(model="bench", prompt=PROMPTS[0], max_new_tokens=1)
    stubs, channels, metadata = {}, [], {}
    for name, port in ports.items():
        sec = security[name]
        channel = sec.channel(port) if sec else grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        stubs[name] = generate_pb2_grpc.GeneratorStub(channel)
        metadata[name] = sec.metadata if sec else None
    seconds: dict[str, list[float]] = {name: [] for name in ports}
    try:
        for index in range(rounds):
            order = list(ports) if index % 2 == 0 else list(reversed(ports))
            for name in order:
                start = time.perf_counter()
                async for _ in stubs[name].Generate(request, metadata=metadata[name]):
                    pass
                seconds[name].append(time.perf_counter() - start)
    finally:
        for channel in channels:
            await channel.close()
    kept = {name: values[rounds // 10:] for name, values in seconds.items()}  # warm-up
    open_s, secured_s = kept["open"], kept["tls_and_api_key"]
    return {"requests_each": len(open_s),
            "open_p50_ms": round(1e3 * statistics.median(open_s), 3),
            "tls_and_api_key_p50_ms": round(1e3 * statistics.median(secured_s), 3),
            "added_p50_ms": round(1e3 * statistics.median(
                b - a for a, b in zip(open_s, secured_s, strict=True)), 3)}


def security_overhead(model_dir: Path, workdir: Path, args) -> dict:
    """Open against TLS + API key, same model, batching on, interleaved rounds."""
    from lmforge.security.api_keys import new_key
    from lmforge.security.tls_certs import ensure_server_tls

    tls = ensure_server_tls(workdir / "tls", ["127.0.0.1", "localhost"])
    api_key, record = new_key("bench")
    ctx = mp.get_context("spawn")
    servers, ports = {}, {}
    try:
        for name, secured in (("open", None),
                              ("tls_and_api_key", (str(tls.cert), str(tls.key),
                                                   record.encode().decode()))):
            queue = ctx.Queue()
            servers[name] = ctx.Process(target=serve, args=(
                str(model_dir), True, args.max_batch, 1024, args.device, queue, secured))
            servers[name].start()
            ports[name] = queue.get(timeout=120)
        security = {"open": None,
                    "tls_and_api_key": ClientSecurity(tls.ca.read_bytes(), api_key)}
        rounds: dict[str, list[dict]] = {"open": [], "tls_and_api_key": []}
        # a short warm-up of each (first compiles, first TLS handshake), not counted
        for name in rounds:
            asyncio.run(load(ports[name], args.clients, 2.0, security=security[name]))
        paired = asyncio.run(paired_latency(ports, security, 400))
        for index in range(args.rounds):
            order = list(rounds) if index % 2 == 0 else list(reversed(rounds))
            for name in order:
                rounds[name].append(asyncio.run(load(ports[name], args.clients, args.seconds,
                                                     security=security[name])))
    finally:
        for process in servers.values():
            process.kill()
            process.join()

    def median_of(name: str, key: str) -> float:
        return round(statistics.median(r[key] for r in rounds[name]), 2)

    summary = {name: {"requests_per_s": median_of(name, "requests_per_s"),
                      "e2e_p99_ms": median_of(name, "e2e_p99_ms"),
                      "errors": sum(r["errors"] for r in rounds[name]),
                      "rounds": rounds[name]} for name in rounds}
    open_rps = summary["open"]["requests_per_s"]
    secured_rps = summary["tls_and_api_key"]["requests_per_s"]
    return {
        "benchmark": "gateway_load --security", "device": args.device,
        "model": f"{args.preset} preset (Llama, vocab 4096)", "clients": args.clients,
        "seconds_per_round": args.seconds, "rounds": args.rounds, "max_new_tokens": 32,
        **summary,
        "throughput_change_pct": round(100 * (secured_rps - open_rps) / open_rps, 1),
        "p99_change_pct": round(100 * (summary["tls_and_api_key"]["e2e_p99_ms"]
                                       - summary["open"]["e2e_p99_ms"])
                                / summary["open"]["e2e_p99_ms"], 1),
        "target_throughput_change_pct": -5.0,
        "one_token_request_paired": paired,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--preset", default="tiny", help="model size (scheduler presets)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU run")
    parser.add_argument("--security", action="store_true",
                        help="only the cost of TLS + API keys: open vs secured, interleaved")
    parser.add_argument("--rounds", type=int, default=3, help="--security: rounds of each")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.security:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = build_model(Path(tmp), args.preset)
            report = security_overhead(model_dir, Path(tmp), args)
        text = json.dumps(report, indent=1)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        return 0
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
