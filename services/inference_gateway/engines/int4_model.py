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

On CUDA the same weights go to tinygemm (`_convert_weight_to_int4pack` /
`_weight_int4pack_mm`, compute capability 8.0 or newer): its packer takes the codes
as uint8 pairs [out, in / 2], the even column in the high nibble, and an inner
k-tile count (2, 4 or 8, with `in` a multiple of 16 tiles); its scales and zeros are
the same [groups, out, 2] bf16 pairs with the same (code - 8) * scale + zero. That
path has not run on hardware in this repository's CI (no GPU here), so every
Int4Linear checks itself when it is built, on either device: a few random rows
through the kernel against the same rows through the dequantised weight. A layer
that fails the check is served dequantised, and `load_int4_model` names it.

The kernels take groups of 32, 64, 128 or 256 input columns and output widths that
are multiples of 16 (CPU) or 8 (CUDA). A layer outside that (a custom model's odd
width) is dequantised to a plain Linear at load, and `load_int4_model` says which
layers did.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from lmforge import awq_gemm
from lmforge.modeling import empty_model_of
from services.inference_gateway.engines.int4_report import Int4Report

log = logging.getLogger("lmforge.gateway.int4")

KERNEL_GROUPS = (32, 64, 128, 256)
COMPUTE_DTYPE = torch.bfloat16
"""What the int4 kernels compute in (see above: the CPU one's other dtypes are 4-140x
slower; tinygemm takes bf16 only)."""
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
"""The gateway's names for the dtypes (LMFORGE_GATEWAY_DTYPE)."""
CPU_OUT_MULTIPLE = 16
CUDA_OUT_MULTIPLE = 8
CUDA_INNER_K_TILES = (8, 4, 2)
"""tinygemm's k-tile counts, largest first: each tile is 16 input columns."""
SELF_CHECK_ROWS = 4
SELF_CHECK_TOLERANCE = 2e-2
"""Largest |kernel - reference| allowed, relative to the reference's largest output:
bf16 rounding of the input and the scales costs well under 1%; a packing mistake
(nibbles swapped, groups misaligned) costs the order of the output itself."""


class Int4KernelError(ValueError):
    """The int4 kernel cannot take a layer, or took it and computed something else.

    `kind` is the reason without the layer's own figures, what /v1/models and
    model.deployed say (grouped over layers); the message with the figures is logged."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def _refusal(what: str, error: BaseException) -> Int4KernelError:
    """A packer's or kernel's own error as the layer's refusal; running out of device
    memory is not a refusal (serving the layer dequantised would take more of it)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        raise error
    return Int4KernelError(f"torch's int4 {what} refused the layer", str(error))


def _inner_k_tiles(in_features: int) -> int | None:
    return next((t for t in CUDA_INNER_K_TILES if in_features % (16 * t) == 0), None)


def kernel_takes(out_features: int, in_features: int, group: int, device: str = "cpu"
                 ) -> bool:
    if group not in KERNEL_GROUPS or in_features % group:
        return False
    if device.startswith("cuda"):
        return (out_features % CUDA_OUT_MULTIPLE == 0
                and _inner_k_tiles(in_features) is not None)
    return out_features % CPU_OUT_MULTIPLE == 0


def cuda_kernel_available(device: str) -> tuple[bool, str]:
    """Whether tinygemm can run on `device`, and why not (it needs NVIDIA sm_80 or
    newer; ROCm's build of it wants other widths and is not wired)."""
    if not torch.cuda.is_available():
        return False, f"torch sees no CUDA device for {device!r}"
    if torch.version.hip:
        return False, "the int4 kernel is wired for NVIDIA GPUs only, not ROCm"
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if major < 8:
        return False, (f"{torch.cuda.get_device_name(torch.device(device))} is sm_{major}{minor}; "
                       "torch's int4 CUDA kernel (tinygemm) needs sm_80 or newer")
    return True, ""


class Int4Linear(nn.Module):
    """y = x @ W.T (+ bias) with W held as int4 in the kernel's packed layout, on the
    CPU (torch's int4 CPU kernel) or CUDA (tinygemm)."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor

    def __init__(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None, *, device: str = "cpu") -> None:
        super().__init__()
        codes, zeros = awq_gemm.unpack(qweight, qzeros)
        self.out_features, self.in_features = codes.shape
        self.group_size = awq_gemm.group_size_of(qweight, scales)
        self.on_cuda = device.startswith("cuda")
        if not kernel_takes(self.out_features, self.in_features, self.group_size, device):
            raise Int4KernelError(
                f"the int4 {'CUDA' if self.on_cuda else 'CPU'} kernel cannot take its shape",
                f"{self.out_features}x{self.in_features} in groups of {self.group_size}")
        try:
            if self.on_cuda:
                pairs = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
                tiles = _inner_k_tiles(self.in_features)
                packed = torch.ops.aten._convert_weight_to_int4pack(
                    pairs.to(device).contiguous(), tiles)
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    codes.to(torch.int32).contiguous(), 1)
        except (RuntimeError, NotImplementedError) as refused:  # e.g. a build without it
            raise _refusal("packer", refused) from refused
        self.register_buffer("packed", packed)
        scale = scales.float()                                  # [groups, out]
        zero = (8 - zeros.t().float()) * scale                  # kernel's float zero
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1)
                             .to(device=device, dtype=COMPUTE_DTYPE).contiguous())
        self.bias = (None if bias is None
                     else nn.Parameter(bias.to(device), requires_grad=False))

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        if self.on_cuda:
            return torch.ops.aten._weight_int4pack_mm(rows, self.packed, self.group_size,
                                                      self.scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size,
                                                          self.scales_and_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE).contiguous()
        y = self._matmul(rows)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @torch.inference_mode()
    def check_against(self, weight: torch.Tensor) -> None:
        """Raise Int4KernelError unless the kernel computes x @ weight.T (the dequantised
        weight [out, in]) on a few seeded random rows."""
        generator = torch.Generator().manual_seed(0)
        rows = torch.randn(SELF_CHECK_ROWS, self.in_features, generator=generator
                           ).to(COMPUTE_DTYPE)
        expected = rows.float() @ weight.float().t()
        try:
            got = self._matmul(rows.to(self.packed.device)).float().cpu()
        except (RuntimeError, NotImplementedError) as refused:
            raise _refusal("kernel", refused) from refused
        error = float((got - expected).abs().max())
        limit = SELF_CHECK_TOLERANCE * float(expected.abs().max()) + 1e-6
        if not error <= limit:
            raise Int4KernelError(
                f"the int4 {'CUDA' if self.on_cuda else 'CPU'} kernel's output differs from "
                "the dequantised weight's", f"by {error:.3g} (allowed {limit:.3g})")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, int4, {'cuda' if self.on_cuda else 'cpu'}")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load_int4_model(model_dir: Path, dtype: torch.dtype, device: str = "cpu"
                    ) -> tuple[PreTrainedModel, Int4Report]:
    """The packed model in `model_dir` on `device` with Int4Linear layers (computing in
    bf16) and every other weight in `dtype`; also which layers were served dequantised
    instead and why (a shape the kernel cannot take, a failed self-check), each reason
    logged too."""
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    model = empty_model_of(model_dir)
    modules = awq_gemm.packed_modules(state)
    dequantised: dict[str, str] = {}
    for module_name in modules:
        qweight, qzeros, scales = (state.pop(f"{module_name}.{s}") for s in awq_gemm.SUFFIXES)
        bias = state.get(f"{module_name}.bias")
        weight = awq_gemm.dequantize(qweight, qzeros, scales)
        try:
            linear = Int4Linear(qweight, qzeros, scales, bias, device=device)
            linear.check_against(weight)
        except Int4KernelError as refused:
            state[f"{module_name}.weight"] = weight
            dequantised[module_name] = refused.kind
            log.warning("%s: %s served dequantised: %s", model_dir, module_name, refused)
            continue
        state.pop(f"{module_name}.bias", None)  # held by the Int4Linear
        _set_module(model, module_name, linear)
    missing, unexpected = model.load_state_dict(state, strict=False)
    int4 = {name for name in modules if name not in dequantised}
    left = [k for k in missing if k.rpartition(".")[0] not in int4]
    if left or unexpected:
        raise ValueError(f"{model_dir}: weights missing {left[:5]}, unexpected "
                         f"{unexpected[:5]}")
    as_module: nn.Module = model
    as_module.to(device=device, dtype=dtype)
    for module in as_module.modules():  # .to(fp32) must not widen the kernel's scales
        if isinstance(module, Int4Linear):
            module.scales_and_zeros = module.scales_and_zeros.to(COMPUTE_DTYPE)
    report = Int4Report(layers=len(modules), dequantised=dequantised)
    if dequantised:
        log.warning("%s: %s", model_dir, report.describe(DTYPE_NAMES.get(dtype, str(dtype))))
    return model.eval(), report


def dequantised_report(model_dir: Path, why: str) -> Int4Report:
    """The report of a packed model served dequantised as a whole, for `why`."""
    names: list[str] = []
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as tensors:
            names += [k.removesuffix(".qweight") for k in tensors.keys()  # noqa: SIM118
                      if k.endswith(".qweight")]  # (safe_open is not iterable)
    return Int4Report(layers=len(names), dequantised=dict.fromkeys(names, why))
