"""ONNX export of the decoder with its KV cache, checked against PyTorch in onnxruntime.

The graph (its inputs and outputs are described in lmforge.onnx_decoder) takes
the cache of earlier positions and returns it extended, so a server decodes one
token per step. It was a logits-only graph before, which re-ran the whole
sequence for every new token: at 128 new tokens on the tiny preset the cached
graph decodes many times faster (benchmarks/onnx_decode.py has the figure).

Batch, sequence and past length are all dynamic. It is exported with the dynamo
exporter (the TorchScript one is deprecated): the model's own `DynamicCache` is
built from the flat past tensors inside the traced forward, so the graph holds
transformers' real attention and rotary code, not a re-implementation. An empty
past (length 0) works in onnxruntime, so one graph serves both the prompt and
the decode steps.

The check decodes in onnxruntime and in PyTorch side by side, step by step,
feeding both the same tokens: a prompt, then 32 single tokens through the cache
(fewer only where the model's context is shorter), at batch 1 and batch 3. The
largest absolute logit difference over all steps is reported and must stay
under a tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from lmforge.failures import BadInput
from lmforge.onnx_decoder import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    DecoderCache,
    OnnxDecoder,
    cache_input_names,
    cache_output_names,
)

ONNX_OPSET = 18
PARITY_STEPS = 32
"""Decode steps after the prompt over which the graph must match PyTorch."""


class DecoderWithCache(torch.nn.Module):
    """(input_ids, attention_mask, position_ids, *past) -> (logits, *present), flat
    tensors in and out, as an ONNX graph needs them."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.num_layers: int = model.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        cache = DynamicCache(pairs, config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, use_cache=True)
        present: list[torch.Tensor] = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


class OnnxMismatchError(BadInput, RuntimeError):
    pass


def kv_cache_shape(model: PreTrainedModel) -> tuple[int, int]:
    """(kv_heads, head_dim) of the model's attention."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads)
    return config.num_key_value_heads, head_dim


def export_decoder_onnx(model: PreTrainedModel, path: Path, *, max_seq_len: int) -> None:
    """Write the KV-cache decoder graph of `model` (fp32) to `path`."""
    from torch.export import Dim

    wrapper = DecoderWithCache(model).eval()
    layers = wrapper.num_layers
    kv_heads, head_dim = kv_cache_shape(model)
    # Example sizes only need to be distinct and > 1, so that no axis is specialised.
    batch_size, sequence, past = 2, 3, 5
    example = (torch.zeros((batch_size, sequence), dtype=torch.long),
               torch.ones((batch_size, past + sequence), dtype=torch.long),
               torch.arange(past, past + sequence).expand(batch_size, sequence),
               *[torch.zeros((batch_size, kv_heads, past, head_dim))
                 for _ in range(2 * layers)])
    batch = Dim("batch", min=1, max=1024)
    seq = Dim("sequence", min=1, max=max_seq_len)
    past_seq = Dim("past_sequence", min=0, max=max_seq_len)
    # The mask spans past + sequence; export's Dim arithmetic cannot add two Dims.
    total = Dim("total_sequence", min=1, max=2 * max_seq_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        wrapper, example, str(path), dynamo=True, opset_version=ONNX_OPSET,
        input_names=[INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *cache_input_names(layers)],
        output_names=[LOGITS, *cache_output_names(layers)],
        dynamic_shapes={"input_ids": {0: batch, 1: seq},
                        "attention_mask": {0: batch, 1: total},
                        "position_ids": {0: batch, 1: seq},
                        "past": tuple({0: batch, 2: past_seq} for _ in range(2 * layers))},
        external_data=False, verbose=False,
    )


def _prompts(tokens: np.ndarray, batch: int, length: int) -> np.ndarray:
    needed = batch * length
    source = np.resize(tokens, needed) if len(tokens) < needed else tokens[:needed]
    return source.reshape(batch, length).astype(np.int64)


def parity_steps(max_seq_len: int) -> int:
    """Decode steps the check runs: PARITY_STEPS, fewer only where the context leaves
    no room for them after a two-token prompt."""
    if max_seq_len < 3:
        raise ValueError(f"a context of {max_seq_len} tokens leaves no room to decode")
    return min(PARITY_STEPS, max_seq_len - 2)


def check_decode_against_torch(model: PreTrainedModel, path: Path, tokens: np.ndarray, *,
                               max_seq_len: int, tolerance: float = 1e-3
                               ) -> tuple[float, int]:
    """(max |logits_ort - logits_torch|, decode steps) over a prompt and
    `parity_steps(max_seq_len)` cached decode steps, at batch 1 and 3, prompts taken
    from `tokens`; raises OnnxMismatchError above `tolerance`."""
    from transformers import DynamicCache

    steps = parity_steps(max_seq_len)
    decoder = OnnxDecoder(path)
    worst = 0.0
    for batch, prompt_len in ((1, min(7, max_seq_len - steps)),
                              (3, min(16, max_seq_len - steps))):
        ids = _prompts(tokens, batch, prompt_len)
        torch_cache = DynamicCache(config=model.config)
        ort_cache: DecoderCache | None = None
        for step in range(steps + 1):
            with torch.inference_mode():
                out = model(input_ids=torch.from_numpy(ids), cache=torch_cache, use_cache=True)
            expected = out.logits.float().numpy()
            torch_cache = out.cache
            got, ort_cache = decoder.forward(ids, ort_cache)
            if got.shape != expected.shape:
                raise OnnxMismatchError(f"ONNX logits shape {got.shape} != PyTorch "
                                        f"{expected.shape} at decode step {step}")
            worst = max(worst, float(np.abs(got - expected).max()))
            # Both sides get PyTorch's greedy choice, so a near-tie cannot make them diverge.
            ids = expected[:, -1].argmax(axis=-1)[:, None].astype(np.int64)
    if not worst <= tolerance:
        raise OnnxMismatchError(
            f"ONNX logits differ from PyTorch by {worst:.3g} over {steps} cached decode "
            f"steps (tolerance {tolerance})")
    return worst, steps
