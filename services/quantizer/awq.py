"""Activation-aware weight quantization (AWQ, Lin et al. 2023), our own implementation.

Why it beats round-to-nearest: a few input channels carry much larger activations
than the rest, and the weights that meet them matter most. Scaling those weight
columns up by s (and the input down by 1/s, folded into the preceding RMSNorm or
Linear, so the fp model computes the same function) gives them more of the int4
grid. The scale is searched, not guessed: s = mean|x|^α per input channel, α on a
grid in [0, 1), keeping the α whose quantized block output is closest (MSE) to the
fp one on the calibration data. Then each Linear's clipping range is searched per
group: shrinking the largest magnitude trades a little error on outliers for finer
steps everywhere else, again judged on the Linear's outputs.

The decoder is walked one layer at a time. A layer's calibration inputs are the
previous layer's outputs with its scales applied but not quantized (as AutoAWQ
does), so each layer is searched against the fp function it must reproduce. The
four groups of a Llama-family layer, with the module whose output judges them:

- q, k, v    after input_layernorm          -> the attention block
- o          after v (same width only: MHA)  -> o itself
- gate, up   after post_attention_layernorm -> the MLP block
- down       after up                        -> down itself

Checked against AutoAWQ's quantizer (awq/quantize/quantizer.py): the same α grid
(20) and sqrt(max·min) normalisation, the same judging modules (the whole attention
for q/k/v, the whole MLP for gate/up, o only when v's width equals o's), clipping on
sampled tokens, per-group output error, q and k unclipped. Differences, on purpose:
each group's input is recorded again after the previous group's scales are folded
(AutoAWQ searches all four on the layer's original inputs), the clip grid is 20
ratios down to 0.5 (AutoAWQ: 10 down to 0.55), and the int4 range always contains 0.
`duo_scaling` (AutoAWQ's later default) is an option, off: it drops α = 0, which is
round-to-nearest itself, from the grid. The fold is pinned by a test: with clipping
off the scaled fp model computes what the original did.

The searches know nothing of files or events: `awq_quantize` takes a model and
token windows, returns `Int4Weight`s, and leaves the model holding the scaled,
clipped fp weights (so it can be evaluated with `fake_quantize`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from services.quantizer.int4 import Int4Weight, choose_group_size, fake_quantize, quantize

log = logging.getLogger("lmforge.quantizer.awq")

CLIP_CHUNK_ROWS = 256
"""Output channels searched at once in the clipping search (bounds its memory)."""


# The parts of a Llama-family decoder layer (Llama, Qwen2) the search touches.
class _Attention(Protocol):
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear

    def __call__(self, *, hidden_states: torch.Tensor, **kwargs: Any
                 ) -> tuple[torch.Tensor, Any]: ...


class _Mlp(Protocol):
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class _Layer(Protocol):
    self_attn: _Attention
    mlp: _Mlp
    input_layernorm: nn.Module
    post_attention_layernorm: nn.Module

    def __call__(self, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor: ...


def decoder_layers(model: nn.Module) -> list[_Layer]:
    """The decoder layers of a Llama-family causal LM (`model.model.layers`)."""
    return cast(list[_Layer], list(cast(Any, model).model.layers))


@dataclass(frozen=True, slots=True, kw_only=True)
class AwqConfig:
    group_size: int = 128
    """Input columns per scale (a layer whose width it does not divide gets its own);
    0: one group per output channel."""
    bits: int = 4
    """Code width: 4 is what is packed and served; 3 or 2 only to measure the search
    where round-to-nearest's loss is large (int4.py)."""
    duo_scaling: bool = False
    """Divide the activation term by the weights' own per-channel magnitude,
    s = mean|x|^α / mean|w|^(1-α), as later AutoAWQ versions do; off: s = mean|x|^α,
    the paper's form, whose α = 0 is round-to-nearest itself."""
    scale_grid: int = 20
    """α values tried for the per-channel scales: 0, 1/grid, ..., (grid-1)/grid."""
    clip_grid: int = 20
    """Shrink ratios tried for each group's clipping range, from 1 down to max_shrink."""
    max_shrink: float = 0.5
    """The smallest share of a group's largest magnitude that clipping may keep."""
    clip_tokens: int = 2048
    """Calibration tokens the clipping search judges on (sampled evenly)."""
    search_clip: bool = True

    def __post_init__(self) -> None:
        if self.group_size < 0:
            raise ValueError(f"group_size {self.group_size} must be positive, or 0 for "
                             "whole rows")
        if not 2 <= self.bits <= 4:
            raise ValueError(f"bits {self.bits} must be 2, 3 or 4")
        if self.scale_grid < 1 or self.clip_grid < 1:
            raise ValueError("scale_grid and clip_grid must be at least 1")
        if not 0 < self.max_shrink <= 1:
            raise ValueError(f"max_shrink {self.max_shrink} must be in (0, 1]")


@dataclass(slots=True)
class AwqResult:
    weights: dict[str, Int4Weight]
    """Quantized weights by parameter name (`model.layers.0.self_attn.q_proj.weight`)."""
    alphas: dict[str, float] = field(default_factory=dict)
    """The α chosen per group (named by its first Linear)."""
    seconds: float = 0.0


def calibration_windows(tokens: np.ndarray, *, samples: int, length: int, seed: int = 0
                        ) -> torch.Tensor:
    """Up to `samples` non-overlapping windows of `length` tokens from `tokens`, chosen
    at random (seeded); fewer (or one shorter window) when the data is smaller."""
    if len(tokens) < 2:
        raise ValueError("calibration needs at least two tokens of training data")
    length = min(length, len(tokens))
    count = len(tokens) // length
    chosen = np.random.default_rng(seed).permutation(count)[:samples]
    windows = tokens[: count * length].reshape(count, length)[np.sort(chosen)]
    return torch.from_numpy(windows.astype(np.int64))


class _Stop(Exception):
    """Raised by the hook that captured the first layer's inputs."""


def _first_layer_inputs(model: nn.Module, ids: torch.Tensor
                        ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The hidden states and keyword arguments (rotary tables, mask) the model hands to
    its first decoder layer."""
    layer = cast(nn.Module, decoder_layers(model)[0])
    captured: dict[str, Any] = {}

    def grab(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    kwargs = captured["kwargs"]
    kwargs["use_cache"] = False
    return captured["hidden"], kwargs


def _input_of(layer: _Layer, hidden: torch.Tensor, kwargs: dict[str, Any],
              module: nn.Module) -> torch.Tensor:
    """What `module` (inside `layer`) reads when the layer runs on `hidden`."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    try:
        layer(hidden, **kwargs)
    finally:
        handle.remove()
    return seen[0]


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean())


def _fold_inverse_scale(previous: nn.Module, scales: torch.Tensor) -> None:
    """Divide the output channels of `previous` (an RMSNorm or a Linear) by `scales`."""
    weight = cast(torch.Tensor, previous.weight)
    if weight.ndim == 1:
        weight.div_(scales)
    else:
        weight.div_(scales[:, None])
    bias = getattr(previous, "bias", None)
    if bias is not None:
        bias.div_(scales)


def _weight_magnitude(linears: list[nn.Linear], group: int) -> torch.Tensor:
    """Per input channel, the mean over output channels of |w| relative to its group's
    largest |w| (AutoAWQ's w_mean for duo scaling)."""
    weight = torch.cat([linear.weight.detach().float() for linear in linears])
    grouped = weight.abs().reshape(weight.shape[0], -1, group)
    relative = grouped / (grouped.amax(dim=-1, keepdim=True) + 1e-6)
    return relative.reshape(weight.shape).mean(dim=0)


def _search_scales(linears: list[nn.Linear], groups: list[int], x: torch.Tensor,
                   block: Callable[[], torch.Tensor], config: AwqConfig
                   ) -> tuple[torch.Tensor, float]:
    """The per-input-channel scales (and their α) that make `block()`'s output with the
    linears quantized closest to its fp output."""
    reference = block()
    x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(dim=0)
    w_mean = _weight_magnitude(linears, groups[0]) if config.duo_scaling else None
    originals = [linear.weight.detach().clone() for linear in linears]
    best: tuple[float, float, torch.Tensor] = (float("inf"), 0.0,
                                                torch.ones_like(x_mean))
    try:
        for step in range(config.scale_grid):
            alpha = step / config.scale_grid
            scales = x_mean.pow(alpha)
            if w_mean is not None:
                scales = scales / (w_mean.pow(1 - alpha) + 1e-4)
            scales = scales.clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            for linear, original, group in zip(linears, originals, groups, strict=True):
                scaled = original * scales[None, :].to(original.dtype)
                linear.weight.copy_(fake_quantize(scaled, group, bits=config.bits)
                                    / scales[None, :])
            error = _mse(block(), reference)
            if error < best[0]:
                best = (error, alpha, scales)
    finally:
        for linear, original in zip(linears, originals, strict=True):
            linear.weight.copy_(original)
    return best[2], best[1]


def _search_clip(weight: torch.Tensor, group: int, x: torch.Tensor, config: AwqConfig
                 ) -> torch.Tensor:
    """Per (output channel, group) largest magnitude to keep: [out, in / group]."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > config.clip_tokens:
        rows = rows[torch.linspace(0, rows.shape[0] - 1, config.clip_tokens).long()]
    xg = rows.float().reshape(rows.shape[0], -1, group)  # [tokens, groups, group]
    clips = []
    # Output channels in chunks: the per-group outputs are tokens x chunk x groups.
    for chunk in weight.float().split(CLIP_CHUNK_ROWS):
        wg = chunk.reshape(chunk.shape[0], -1, group)
        reference = torch.einsum("tgc,ogc->tog", xg, wg)
        max_abs = wg.abs().amax(dim=-1)
        best_error = torch.full_like(max_abs, float("inf"))
        best_clip = max_abs.clone()
        for step in range(config.clip_grid):
            ratio = 1 - (1 - config.max_shrink) * step / max(1, config.clip_grid - 1)
            clip = max_abs * ratio
            quantized = fake_quantize(chunk, group, clip=clip, bits=config.bits
                                      ).reshape(wg.shape)
            error = (torch.einsum("tgc,ogc->tog", xg, quantized) - reference
                     ).pow(2).mean(dim=0)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_clip = torch.where(better, clip, best_clip)
        clips.append(best_clip)
    return torch.cat(clips)


@dataclass(frozen=True, slots=True)
class _Group:
    previous: nn.Module
    linears: list[nn.Linear]
    names: list[str]
    source: nn.Module
    """The module whose input all `linears` read (its recorded input is `x`)."""
    block: Callable[[torch.Tensor], torch.Tensor]
    """Runs the judging block on that input."""


def _layer_groups(layer: _Layer, prefix: str, kwargs: dict[str, Any]) -> list[_Group]:
    attn, mlp = layer.self_attn, layer.mlp

    def attention(x: torch.Tensor) -> torch.Tensor:
        return attn(hidden_states=x, **kwargs)[0]

    groups = [
        _Group(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj],
               [f"{prefix}.self_attn.{n}_proj" for n in "qkv"], attn.q_proj, attention),
    ]
    if attn.v_proj.weight.shape[0] == attn.o_proj.weight.shape[1]:
        groups.append(_Group(attn.v_proj, [attn.o_proj], [f"{prefix}.self_attn.o_proj"],
                             attn.o_proj, attn.o_proj))
    groups += [
        _Group(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj],
               [f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"], mlp.gate_proj, mlp),
        _Group(mlp.up_proj, [mlp.down_proj], [f"{prefix}.mlp.down_proj"], mlp.down_proj,
               mlp.down_proj),
    ]
    return groups


@torch.inference_mode()
def awq_quantize(model: nn.Module, calibration: torch.Tensor, config: AwqConfig
                 ) -> AwqResult:
    """Search and apply AWQ scales and clipping layer by layer; quantize every Linear of
    the decoder layers. `model` is changed in place (scaled, clipped fp weights)."""
    started = time.perf_counter()
    hidden, kwargs = _first_layer_inputs(model, calibration)
    result = AwqResult(weights={})
    for index, layer in enumerate(decoder_layers(model)):
        prefix = f"model.layers.{index}"
        groups = _layer_groups(layer, prefix, kwargs)
        for group in groups:
            # Inputs are recorded again for each group: the previous group's scales
            # changed what the later modules see.
            x = _input_of(layer, hidden, kwargs, group.source)
            sizes = [choose_group_size(linear.in_features, config.group_size)
                     for linear in group.linears]
            scales, alpha = _search_scales(group.linears, sizes, x,
                                           partial(group.block, x), config)
            _fold_inverse_scale(group.previous, scales)
            for linear in group.linears:
                linear.weight.mul_(scales[None, :])
            result.alphas[group.names[0]] = alpha
        for group in groups:
            x = _input_of(layer, hidden, kwargs, group.source)
            for linear, name in zip(group.linears, group.names, strict=True):
                size = choose_group_size(linear.in_features, config.group_size)
                # As AutoAWQ: q and k are not clipped, their error is judged by the
                # softmax, not by their own outputs.
                clip = (_search_clip(linear.weight, size, x, config)
                        if config.search_clip and not name.endswith(("q_proj", "k_proj"))
                        else None)
                quantized = quantize(linear.weight, size, clip=clip, bits=config.bits)
                if clip is not None:
                    linear.weight.copy_(torch.maximum(torch.minimum(
                        linear.weight.reshape((*quantized.scales.shape, size)),
                        clip[..., None]), -clip[..., None]).reshape(linear.weight.shape))
                result.weights[f"{name}.weight"] = quantized
        hidden = layer(hidden, **kwargs)
        log.debug("AWQ layer %d: alphas %s", index,
                  {k: v for k, v in result.alphas.items() if k.startswith(prefix + ".")})
    result.seconds = time.perf_counter() - started
    return result
