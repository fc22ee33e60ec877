"""Serve an AWQ-packed int4 model: weight-only int4 Linears on torch's CPU int4 kernel.

Why torch's kernel: `_weight_int4pack_mm_for_cpu` multiplies activations by int4
weights unpacked group by group inside the kernel, so only the packed nibbles and
one scale and zero per group are held, about 0.28x the bytes of bf16 and 0.14x of
fp32, and no dequantised copy exists. torchao's int4 weight-only CPU path calls
the same kernel; it is not installed here, and adds nothing for this.

The AutoAWQ GEMM files (lmforge.awq_gemm) are converted at load time into the
kernel's own layout: codes as [out, in] int32 for `_convert_weight_to_int4pack_for_cpu`,
and per group a (scale, zero) pair where the kernel computes (code - 8) * scale + zero,
so zero = (8 - awq_zero) * scale makes it AWQ's (code - awq_zero) * scale.

The kernel takes groups of 32, 64, 128 or 256 input columns and output widths that are
multiples of 16. A layer outside that (a custom model's odd width) is dequantised to a
plain Linear at load, and `load_int4_model` says which layers did.

On CUDA (tinygemm's `_weight_int4pack_mm`) nothing is wired yet: the model is served
dequantised there, and the precision reported says so (engines.served_precision).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from lmforge import awq_gemm
from lmforge.modeling import empty_model_of

log = logging.getLogger("lmforge.gateway.int4")

KERNEL_GROUPS = (32, 64, 128, 256)
KERNEL_OUT_MULTIPLE = 16


def kernel_takes(out_features: int, in_features: int, group: int) -> bool:
    return (group in KERNEL_GROUPS and in_features % group == 0
            and out_features % KERNEL_OUT_MULTIPLE == 0)


class Int4Linear(nn.Module):
    """y = x @ W.T (+ bias) with W held as int4 in the CPU kernel's packed layout."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor

    def __init__(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        codes, zeros = awq_gemm.unpack(qweight, qzeros)
        self.out_features, self.in_features = codes.shape
        self.group_size = awq_gemm.group_size_of(qweight, scales)
        if not kernel_takes(self.out_features, self.in_features, self.group_size):
            raise ValueError(f"the int4 CPU kernel cannot take a {self.out_features}x"
                             f"{self.in_features} weight in groups of {self.group_size}")
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes.to(torch.int32).contiguous(), 1))
        scale = scales.float()                                  # [groups, out]
        zero = (8 - zeros.t().float()) * scale                  # kernel's float zero
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1)
                             .contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows.to(self.scales_and_zeros.dtype), self.packed, self.group_size,
            self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, int4")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load_int4_model(model_dir: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, list[str]]:
    """The packed model in `model_dir` on the CPU with Int4Linear layers (activations,
    scales and the other weights in `dtype`); also the layers dequantised instead."""
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    model = empty_model_of(model_dir)
    dequantised: list[str] = []
    for module_name in awq_gemm.packed_modules(state):
        qweight, qzeros, scales = (state.pop(f"{module_name}.{s}") for s in awq_gemm.SUFFIXES)
        bias = state.pop(f"{module_name}.bias", None)
        group = awq_gemm.group_size_of(qweight, scales)
        out_features = qweight.shape[1] * awq_gemm.NIBBLES
        if kernel_takes(out_features, qweight.shape[0], group):
            _set_module(model, module_name, Int4Linear(qweight, qzeros, scales, bias))
        else:
            state[f"{module_name}.weight"] = awq_gemm.dequantize(qweight, qzeros, scales)
            if bias is not None:
                state[f"{module_name}.bias"] = bias
            dequantised.append(module_name)
    missing, unexpected = model.load_state_dict(state, strict=False)
    left = [k for k in missing if not k.endswith(("packed", "scales_and_zeros"))]
    if left or unexpected:
        raise ValueError(f"{model_dir}: weights missing {left[:5]}, unexpected "
                         f"{unexpected[:5]}")
    as_module: nn.Module = model
    as_module.to(dtype)
    if dequantised:
        log.warning("%s: %d layer(s) the int4 kernel cannot take are served dequantised: %s",
                    model_dir, len(dequantised), ", ".join(dequantised))
    return model.eval(), dequantised

