"""Sampling the next token: greedy, temperature, top-k, top-p, one seeded stream per request.

Shared by every local engine, so a seeded request gets the same tokens from the
single-request engine, the batching loop (alone or inside any batch) and ONNX.
"""

from __future__ import annotations

import random
import secrets

import torch

from services.inference_gateway.engines.base import SamplingParams


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
