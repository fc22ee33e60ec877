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
all multiples of 32 (the tiny preset's MLP width 352 gets group 32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_CODE = 15
KERNEL_GROUP_SIZES = (256, 128, 64, 32)
"""Group sizes int4 GEMM kernels take, largest first."""


def choose_group_size(in_features: int, requested: int) -> int:
    """`requested` when it divides `in_features`; else the largest kernel group size up to
    `requested` that does; else the largest divisor of `in_features` up to `requested`."""
    if requested <= 0:
        raise ValueError(f"group size {requested} must be positive")
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


def quantize(weight: torch.Tensor, group: int, *, clip: torch.Tensor | None = None
             ) -> Int4Weight:
    """Round-to-nearest int4 of `weight` [out, in] with `group` columns per scale.

    `clip` [out, in / group]: the largest magnitude kept per group (AWQ's clipping);
    values beyond it saturate."""
    out_features, in_features = weight.shape
    if in_features % group:
        raise ValueError(f"in_features {in_features} is not a multiple of group {group}")
    grouped = weight.float().reshape(out_features, -1, group)
    if clip is not None:
        grouped = torch.maximum(torch.minimum(grouped, clip[..., None]), -clip[..., None])
    low = grouped.amin(dim=-1).clamp(max=0)  # zero stays representable
    high = grouped.amax(dim=-1).clamp(min=0)
    scales = ((high - low).clamp(min=1e-5) / MAX_CODE).half().float()
    zeros = torch.round(-low / scales).clamp(0, MAX_CODE)
    codes = torch.round(grouped / scales[..., None]) + zeros[..., None]
    return Int4Weight(codes=codes.clamp(0, MAX_CODE).to(torch.uint8).reshape(weight.shape),
                      zeros=zeros.to(torch.uint8), scales=scales)


def fake_quantize(weight: torch.Tensor, group: int, *, clip: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """`weight` after an int4 round trip, in its own dtype (for searches and evaluation)."""
    return quantize(weight, group, clip=clip).dequantize().to(weight.dtype)
