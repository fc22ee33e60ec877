"""Serve an AWQ-packed int4 model: weight-only int4 Linears on torch's CPU int4 kernel.

Why torch's kernel: `_weight_int4pack_mm_for_cpu` multiplies activations by int4
weights unpacked group by group inside the kernel, so only the packed nibbles and
one scale and zero per group are held, about 0.28x the bytes of bf16 and 0.14x of
fp32, and no dequantised copy exists. torchao's int4 weight-only CPU path calls
the same kernel; it is not installed here, and adds nothing for this.

The kernel runs in bf16 whatever the model's dtype: its fp32 and fp16 paths are not
vectorised. Measured on this machine's AVX512-BF16 CPU, one thread, a 256->704
layer (the small preset's gate): at 1 row bf16 int4 takes 27 us against 31.7 us for
an fp32 dense matmul and 59 us bf16 dense, fp32 int4 694 us; at 64 rows 276 us
against 482 us fp32 dense and 117 us bf16 dense, fp32 int4 38.8 ms. So an int4 layer
casts its input to bf16 and its output back, and holds its scales and zeros in bf16
(the weights it computes with are the packed codes with bf16-rounded scales: about
0.4% of a step off the fp16 scales of the file).

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
COMPUTE_DTYPE = torch.bfloat16
"""What the int4 kernel computes in (see above: its other dtypes are 4-140x slower)."""
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
                             .to(COMPUTE_DTYPE).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size,
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
    """The packed model in `model_dir` on the CPU with Int4Linear layers (computing in
    bf16) and every other weight in `dtype`; also the layers dequantised instead."""
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
    for module in as_module.modules():  # .to(fp32) must not widen the kernel's scales
        if isinstance(module, Int4Linear):
            module.scales_and_zeros = module.scales_and_zeros.to(COMPUTE_DTYPE)
    if dequantised:
        log.warning("%s: %d layer(s) the int4 kernel cannot take are served dequantised: %s",
                    model_dir, len(dequantised), ", ".join(dequantised))
    return model.eval(), dequantised

