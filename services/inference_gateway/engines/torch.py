"""Text generation on a local PyTorch model: KV cache, real sampling, streamed text.

One `GenerationEngine` per loaded model version. `stream()` is a synchronous
generator (the gRPC layer steps it in a worker thread) that yields text
pieces as soon as they decode to whole characters: byte-level BPE can split a
CJK character or an emoji across tokens, so an incomplete tail is held back
rather than sent as U+FFFD.
"""

from __future__ import annotations

import os
import random
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.modeling import load_causal_lm, load_tokenizer


class RequestError(ValueError):
    """The request cannot be served as asked (maps to INVALID_ARGUMENT)."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    top_k: int = 0


@dataclass(frozen=True, slots=True)
class Piece:
    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str = ""


def load_serving_model(model_dir: Path, dtype: str, device: str) -> torch.nn.Module:
    """The model in eval mode on `device` ("cpu", "cuda", "cuda:1") with fp32 or bf16
    weights; a device that is not there is refused here, before anything is served."""
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype {dtype!r} must be fp32 or bf16")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    model = load_causal_lm(model_dir,
                           dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    return model.to(device).eval()


def encode_prompt(tokenizer, context_length: int, prompt: str) -> list[int]:
    """The prompt's token ids, refused when empty or when it leaves no room to generate."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if not ids:
        raise RequestError("prompt encodes to no tokens")
    if len(ids) >= context_length:
        raise RequestError(
            f"prompt of {len(ids)} tokens exceeds the model's context of "
            f"{context_length} tokens (leave room for at least one new token)"
        )
    return ids


def default_threads() -> int:
    """Compute threads for a serving process: all usable cores but one, which is left to
    the event loop (gRPC, HTTP, detokenised pieces). With OMP_WAIT_POLICY=PASSIVE a second
    thread also costs a wake-up per small matmul: on 2 cores one thread decodes the
    demo model 2.5x faster than two."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def request_rng(seed: int) -> random.Random:
    """The random stream of one request: `seed` when given (reproducible), else fresh."""
    return random.Random(seed or secrets.randbits(62))


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                rngs: list[random.Random]) -> list[int]:
    """One next token per row of `logits` [rows, vocab], all rows at once.

    Greedy at temperature 0; else temperature, top-k and nucleus (top-p)
    truncation where asked, and an inverse-CDF draw with one uniform number from each
    row's own random stream — so a seeded request gets the same tokens alone or inside
    any batch. Each pass over a 64 x 4096 batch costs about as much as a layer of a small
    model on a CPU, so rows are only gathered, divided, sorted or arg-maxed when some
    row needs it (the common batch is all rows sampled alike).
    """
    logits = logits.float().cpu()
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if len(sampled) < len(params):
        tokens = torch.argmax(logits, dim=-1)
        if not sampled:
            return tokens.tolist()
        scaled = logits[sampled]
    else:
        tokens = torch.empty(len(params), dtype=torch.long)
        scaled = logits
    rows = [params[i] for i in sampled]
    if any(p.temperature != 1.0 for p in rows):
        scaled = scaled / torch.tensor([p.temperature for p in rows])[:, None]
    for k, p in enumerate(rows):
        if 0 < p.top_k < scaled.shape[-1]:  # keep the k most likely tokens of this row
            if scaled is logits:
                scaled = logits.clone()
            kth = torch.topk(scaled[k], p.top_k).values[-1]
            scaled[k] = torch.where(scaled[k] < kth, float("-inf"), scaled[k])
    probs = torch.softmax(scaled, dim=-1)
    u = torch.tensor([rngs[i].random() for i in sampled], dtype=torch.float32)
    nucleus = [k for k, p in enumerate(rows) if 0 < p.top_p < 1]
    drawn = torch.empty(len(sampled), dtype=torch.long)
    if len(nucleus) < len(rows):
        plain = [k for k, p in enumerate(rows) if not 0 < p.top_p < 1]
        part = probs if not nucleus else probs[plain]
        cdf = torch.cumsum(part, dim=-1)
        picked = torch.searchsorted(cdf, (u[plain] * cdf[:, -1])[:, None])
        drawn[plain] = picked.squeeze(-1).clamp(max=logits.shape[-1] - 1)
    if nucleus:
        top_p = torch.tensor([rows[k].top_p for k in nucleus])
        sorted_probs, order = torch.sort(probs[nucleus], descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always the first token).
        kept = torch.where((cumulative - sorted_probs) < top_p[:, None], sorted_probs,
                           torch.zeros_like(sorted_probs))
        cdf = torch.cumsum(kept, dim=-1)
        picked = torch.searchsorted(cdf, (u[nucleus] * cdf[:, -1])[:, None])
        picked = picked.clamp(max=logits.shape[-1] - 1)
        drawn[nucleus] = order.gather(-1, picked).squeeze(-1)
    tokens[sampled] = drawn
    return tokens.tolist()


def sample_next(logits: torch.Tensor, params: SamplingParams, rng: random.Random) -> int:
    """`sample_rows` for one sequence."""
    return sample_rows(logits[None, :], [params], [rng])[0]


class GenerationEngine:
    def __init__(self, model_dir: Path, *, version: str, dtype: str = "fp32",
                 device: str = "cpu") -> None:
        self.version = version
        self.model = load_serving_model(model_dir, dtype, device)
        self.tokenizer = load_tokenizer(model_dir)
        self.eos_token_id = self.model.config.eos_token_id
        self.context_length = self.model.config.max_position_embeddings

    def encode_prompt(self, prompt: str, max_new_tokens: int) -> list[int]:
        return encode_prompt(self.tokenizer, self.context_length, prompt)

    def stream(self, prompt_ids: list[int], params: SamplingParams,
               cancelled: threading.Event | None = None) -> Iterator[Piece]:
        rng = request_rng(params.seed)
        generated: list[int] = []
        sent = ""
        cache = None
        device = self.model.device
        inputs = torch.tensor([prompt_ids], device=device)
        finish = "length"
        # Generation stops at the context length ("length"), whatever was asked.
        budget = min(params.max_new_tokens, self.context_length - len(prompt_ids))
        for _ in range(budget):
            if cancelled is not None and cancelled.is_set():
                finish = "cancelled"
                break
            # inference_mode is thread-local and this generator is stepped from
            # worker threads: enter it around each forward, never across a yield.
            with torch.inference_mode():
                out = self.model(input_ids=inputs, cache=cache, use_cache=True)
                token = sample_next(out.logits[0, -1], params, rng)
            cache = out.cache
            if token == self.eos_token_id:
                finish = "eos"
                break
            generated.append(token)
            inputs = torch.tensor([[token]], device=device)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue  # half a character: wait for the rest of its bytes
            if len(text) > len(sent):
                yield Piece(text[len(sent):], len(generated), len(prompt_ids))
                sent = text
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        yield Piece(text[len(sent):], len(generated), len(prompt_ids), finish)
