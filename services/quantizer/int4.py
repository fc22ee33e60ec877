"""Asymmetric group-wise int4: the arithmetic both round-to-nearest and AWQ end in.

Each group of `group` input columns of an output channel gets an fp16 scale and an
integer zero point, w ≈ (code - zero) · scale with codes 0..15 spanning the group's
[min, max] (AWQ's clipping narrows that range before it gets here). The scales are
rounded to fp16 before the codes are chosen, because fp16 is what the packed file
stores: what is measured here is exactly what is served.

A layer whose input width is not a multiple of the requested group gets its own
group size (`choose_group_size`): first the largest of the group sizes that int4
kernels take (torch's CPU and CUDA kernels, AutoAWQ, Marlin: 32, 64, 128, 256) that
divides the width, else the largest divisor at all. The default presets' widths are
all multiples of 32 (the tiny preset's MLP width 352 gets group 32). Group 0 asks
for one group per output channel (the whole row).

`bits` below 4 (codes 0..2^bits-1 on the same layout) exists for measurement only:
a model trained for minutes on a CPU loses almost nothing at int4 g128, so the
benchmark also compares AWQ with round-to-nearest at 3 bits, where the baseline's
loss is large enough for the comparison to mean something. Only 4 bits is packed
and served.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_CODE = 15
"""The largest int4 code (the packed and served format)."""
KERNEL_GROUP_SIZES = (256, 128, 64, 32)
"""Group sizes int4 GEMM kernels take, largest first."""


def choose_group_size(in_features: int, requested: int) -> int:
    """`requested` when it divides `in_features`; else the largest kernel group size up to
    `requested` that does; else the largest divisor of `in_features` up to `requested`.
    0 is one group per row: `in_features`."""
    if requested < 0:
        raise ValueError(f"group size {requested} must be positive, or 0 for whole rows")
    if requested == 0:
        return in_features
    if in_features % requested == 0:
        return requested
    for size in KERNEL_GROUP_SIZES:
        if size <= requested and in_features % size == 0:
            return size
    return max(d for d in range(1, min(requested, in_features) + 1) if in_features % d == 0)


@dataclass(frozen=True, slots=True)
class Int4Weight:
    """One Linear weight as int4 codes with per-group zero points and scales."""

    codes: torch.Tensor
    """uint8 [out, in], 0..15."""
    zeros: torch.Tensor
    """uint8 [out, in / group], 0..15."""
    scales: torch.Tensor
    """fp32 [out, in / group], each exactly representable in fp16."""

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        group = self.group_size
        codes = self.codes.float().reshape(self.codes.shape[0], -1, group)
        weight = (codes - self.zeros.float()[..., None]) * self.scales[..., None]
        return weight.reshape(self.codes.shape)


def group_ranges(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min, max) of a [out, in] weight: [out, in / group] each."""
    grouped = weight.float().reshape(weight.shape[0], -1, group)
    return grouped.amin(dim=-1), grouped.amax(dim=-1)


def quantize(weight: torch.Tensor, group: int, *, clip: torch.Tensor | None = None,
             bits: int = 4) -> Int4Weight:
    """Round-to-nearest int4 of `weight` [out, in] with `group` columns per scale.

    `clip` [out, in / group]: the largest magnitude kept per group (AWQ's clipping);
    values beyond it saturate. `bits` < 4 uses codes 0..2^bits-1 (measurement only)."""
    if not 2 <= bits <= 4:
        raise ValueError(f"bits {bits} must be 2, 3 or 4")
    max_code = 2**bits - 1
    out_features, in_features = weight.shape
    if in_features % group:
        raise ValueError(f"in_features {in_features} is not a multiple of group {group}")
    grouped = weight.float().reshape(out_features, -1, group)
    if clip is not None:
        grouped = torch.maximum(torch.minimum(grouped, clip[..., None]), -clip[..., None])
    low = grouped.amin(dim=-1).clamp(max=0)  # zero stays representable
    high = grouped.amax(dim=-1).clamp(min=0)
    scales = ((high - low).clamp(min=1e-5) / max_code).half().float()
    zeros = torch.round(-low / scales).clamp(0, max_code)
    codes = torch.round(grouped / scales[..., None]) + zeros[..., None]
    return Int4Weight(codes=codes.clamp(0, max_code).to(torch.uint8).reshape(weight.shape),
                      zeros=zeros.to(torch.uint8), scales=scales)


def fake_quantize(weight: torch.Tensor, group: int, *, clip: torch.Tensor | None = None,
                  bits: int = 4) -> torch.Tensor:
    """`weight` after an int4 round trip, in its own dtype (for searches and evaluation)."""
    return quantize(weight, group, clip=clip, bits=bits).dequantize().to(weight.dtype)
