"""A lean forward pass for Llama-family models over a slot KV cache.

Why not the model's own forward: at serving batch sizes on a CPU a decoding
step of a small model is mostly Python — Hugging Face builds masks and cache
objects and grows every layer's K/V with `torch.cat` at every step. Here the
cache is preallocated, one row ("slot") per running sequence, and a step writes
one column per row in place; the layers' own modules (projections, MLP) are
called directly, RMSNorm runs as one fused op with the model's weights and
epsilon, and the rotary cos/sin come from a table the model's own rotary module
filled once — so the weights and the arithmetic are the model's.

Slots are kept dense: the running sequences own rows 0..n-1, a finished one is
replaced by the last row (one row copied, nothing shifted), so attention reads
a view of the cache, never a gathered copy. Each row starts at position 0 and
has its own length; a boolean mask hides the columns past it. The length
capacity grows by doubling up to the context length, so memory follows the
longest running sequence, not the worst case. The cache is zero-filled: a row's
columns past its length are masked out of the scores, but the attention weights
still multiply them, and uninitialised memory could hold NaNs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

SUPPORTED = ("llama", "qwen2")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                  torch.Tensor]
"""attend(q, k, v, keys, values): store the new K/V in a layer's cache, return the output."""


# The parts of a Llama-family model (LlamaForCausalLM, Qwen2ForCausalLM) called here.
class _RMSNorm(Protocol):
    weight: torch.Tensor
    variance_epsilon: float


class _Attention(Protocol):
    head_dim: int
    scaling: float
    q_proj: torch.nn.Linear
    k_proj: torch.nn.Linear
    v_proj: torch.nn.Linear
    o_proj: torch.nn.Linear


class _DecoderLayer(Protocol):
    self_attn: _Attention
    input_layernorm: _RMSNorm
    post_attention_layernorm: _RMSNorm
    mlp: Callable[[torch.Tensor], torch.Tensor]


class _Rotary(Protocol):
    rope_type: str

    def __call__(self, x: torch.Tensor, positions: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]: ...


class _Decoder(Protocol):
    embed_tokens: torch.nn.Embedding
    layers: Sequence[_DecoderLayer]
    norm: _RMSNorm
    rotary_emb: _Rotary


class _CausalLM(Protocol):
    config: PreTrainedConfig
    model: _Decoder
    lm_head: torch.nn.Linear


def supports(model: PreTrainedModel) -> bool:
    """Whether `model` is a Llama-family decoder this module can run (no sliding windows)."""
    config = model.config
    if config.model_type not in SUPPORTED:
        return False
    return all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or [])


class SlotDecoder:
    """Prefill and decode for up to `max_rows` sequences, one cache row each."""

    def __init__(self, model: PreTrainedModel, *, max_rows: int, initial_length: int = 64
                 ) -> None:
        if not supports(model):
            raise ValueError(f"the slot decoder runs {SUPPORTED} models with full attention, "
                             f"not {model.config.model_type!r}")
        config = model.config
        self.model = cast(_CausalLM, model)  # a Llama-family model, as `supports` checked
        self.layers = list(self.model.model.layers)
        self.rotary = self.model.model.rotary_emb
        self.max_rows = max_rows
        self.context_length = config.max_position_embeddings
        attention = self.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.scaling = attention.scaling
        self.initial_length = min(initial_length, self.context_length)
        parameter = next(model.parameters())
        self.dtype, self.device = parameter.dtype, parameter.device
        # Rotary cos/sin for every position, computed once by the model's own module, when
        # they do not depend on the sequence length (they do for "dynamic" and "longrope").
        self._rotary_table: tuple[torch.Tensor, torch.Tensor] | None = None
        if getattr(self.rotary, "rope_type", "default") in STATIC_ROPE:
            with torch.inference_mode():
                positions = torch.arange(self.context_length, device=self.device)[None]
                cos, sin = self.rotary(torch.zeros(1, dtype=self.dtype, device=self.device),
                                       positions)
            self._rotary_table = (cos[0], sin[0])
        self.rows = 0                                   # sequences holding rows 0..rows-1
        self.lengths = torch.zeros(max_rows, dtype=torch.long)  # tokens cached per row
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    # -- cache bookkeeping --------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def _ensure_length(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        size = max(self.capacity, self.initial_length)
        while size < needed:
            size *= 2
        size = min(size, self.context_length)
        shape = (self.max_rows, self.kv_heads, size, self.head_dim)
        old_keys, old_values, used = self.keys, self.values, self.capacity
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                     for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                       for _ in self.layers]
        if used:
            for new, old in zip(self.keys + self.values, old_keys + old_values, strict=True):
                new[:, :, :used] = old

    @torch.inference_mode()
    def release(self, row: int) -> int:
        """Free `row`; the last row moves into it. Returns the row that moved (or `row`)."""
        last = self.rows - 1
        if row != last:
            width = int(self.lengths[last])
            for cache in self.keys + self.values:
                cache[row, :, :width] = cache[last, :, :width]
            self.lengths[row] = self.lengths[last]
        self.lengths[last] = 0
        self.rows = last
        if self.rows == 0 and self.capacity > self.initial_length:
            # Idle after long sequences: give the memory back, keep the small cache (zeroing
            # it again would cost more than a short request's whole forward pass).
            self.keys, self.values = [], []
        return last

    # -- forward passes ---------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Put `prompts` into new rows (appended in order); returns their next-token
        logits [len(prompts), vocab]."""
        first, count = self.rows, len(prompts)
        if first + count > self.max_rows:
            raise ValueError(f"{first + count} sequences exceed the {self.max_rows} rows")
        width = max(len(p) for p in prompts)
        if width > self.context_length:
            raise ValueError(f"a prompt of {width} tokens exceeds the context")
        self._ensure_length(width)
        ids = torch.zeros(count, width, dtype=torch.long)
        lengths = torch.tensor([len(p) for p in prompts])
        for i, prompt in enumerate(prompts):
            ids[i, :len(prompt)] = torch.tensor(prompt)
        positions = torch.arange(width).expand(count, width)
        # Causal, and no key past the row's own prompt (right padding is never attended;
        # its K/V land in columns that the row's later tokens overwrite). Prompts of one
        # length need no mask tensor: the kernel's own causal path is faster.
        mask = None
        if any(len(p) != width for p in prompts):
            mask = (torch.ones(width, width, dtype=torch.bool).tril()[None]
                    & (positions < lengths[:, None])[:, None, :])[:, None].to(self.device)
        rows = slice(first, first + count)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            keys[rows, :, :width] = k
            values[rows, :, :width] = v
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                  scale=self.scaling,
                                                  enable_gqa=self.kv_heads != self.heads)

        hidden = self._layers(ids, positions, attend)
        self.lengths[rows] = lengths
        self.rows += count
        return self._logits(hidden[torch.arange(count), lengths - 1])

    @torch.inference_mode()
    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One new token per running row (row i gets tokens[i]); returns logits [rows, vocab]."""
        n = self.rows
        if len(tokens) != n:
            raise ValueError(f"{len(tokens)} tokens for {n} running rows")
        positions = self.lengths[:n].clone()
        width = int(positions.max()) + 1
        self._ensure_length(width)
        hidden_mask = (torch.arange(width)[None, :] > positions[:, None])[:, None, None, :]
        hidden_mask = hidden_mask.to(self.device)
        rows = torch.arange(n, device=self.device)
        columns = positions.to(self.device)
        group = self.heads // self.kv_heads

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            keys[rows, :, columns] = k[:, :, 0]
            values[rows, :, columns] = v[:, :, 0]
            k, v = keys[:n, :, :width], values[:n, :, :width]
            # One query per row: plain batched matmuls (the fused CPU attention kernel
            # costs more than the arithmetic here). Query heads that share a K/V head
            # are stacked on the query axis, so grouped-query attention needs no copies.
            q = q.reshape(n, self.kv_heads, group, self.head_dim)
            scores = torch.matmul(q, k.transpose(-1, -2)).mul_(self.scaling)
            scores.masked_fill_(hidden_mask, float("-inf"))
            out = torch.matmul(torch.softmax(scores, dim=-1), v)
            return out.reshape(n, self.heads, 1, self.head_dim)

        hidden = self._layers(torch.tensor(tokens)[:, None], positions[:, None], attend)
        self.lengths[:n] += 1
        return self._logits(hidden[:, -1])

    def _layers(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend
                ) -> torch.Tensor:
        """Every layer, with the model's own modules; `attend(q, k, v, keys, values)`
        stores the new K/V in the layer's cache and returns the attention output."""
        ids, positions = ids.to(self.device), positions.to(self.device)
        batch, steps = ids.shape
        hidden = self.model.model.embed_tokens(ids)
        if self._rotary_table is not None:
            cos, sin = (table[positions] for table in self._rotary_table)
        else:
            cos, sin = self.rotary(hidden, positions)
        for layer, keys, values in zip(self.layers, self.keys, self.values, strict=True):
            attention = layer.self_attn
            x = _rms_norm(layer.input_layernorm, hidden)
            q = attention.q_proj(x).view(batch, steps, self.heads, self.head_dim)
            k = attention.k_proj(x).view(batch, steps, self.kv_heads, self.head_dim)
            v = attention.v_proj(x).view(batch, steps, self.kv_heads, self.head_dim)
            q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            out = attend(q, k, v.transpose(1, 2), keys, values)
            hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(batch, steps, -1))
            hidden = hidden + layer.mlp(_rms_norm(layer.post_attention_layernorm, hidden))
        return hidden

    def _logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(_rms_norm(self.model.model.norm, last_hidden)).float().cpu()


def _rms_norm(norm: _RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm as one fused op (its module runs six: a small model's decode
    step spends more on dispatching them than on the arithmetic)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
