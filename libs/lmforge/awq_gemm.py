"""The AutoAWQ "GEMM" storage layout of int4 weights, shared by the quantizer (packs)
and the gateway (unpacks into its kernel's own layout).

Why this layout: it is what vLLM, TGI and transformers (with AutoAWQ kernels) load
from a `quantization_config` of `quant_method: awq, version: gemm`, so lmforge's
output needs no conversion anywhere. For a Linear with weight [out, in] and `group`
input columns per scale:

- `qweight` int32 [in, out / 8]: row k holds the codes of input column k; word j of
  it holds output channels 8j..8j+7, nibble i (bits 4i..4i+3) holding channel
  8j + PACK_ORDER[i]. The interleave is AutoAWQ's, made for its CUDA dequantiser;
- `qzeros` int32 [in / group, out / 8]: the zero points, packed the same way;
- `scales` fp16 [in / group, out].

weight[o, k] = (code[o, k] - zero[o, k // group]) * scale[o, k // group].

torch is imported inside the functions: `import lmforge` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble i of a packed word holds output channel PACK_ORDER[i] of its eight."""
NIBBLES = 8
BITS = 4
SUFFIXES = ("qweight", "qzeros", "scales")
"""The tensors of one packed Linear `<module>.<suffix>` (in place of `<module>.weight`)."""


def _pack_columns(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] codes 0..15 -> int32 [rows, cols / 8], interleaved."""
    import torch

    rows, cols = values.shape
    if cols % NIBBLES:
        raise ValueError(f"{cols} columns cannot be packed eight to a word")
    blocks = values.to(torch.int64).reshape(rows, cols // NIBBLES, NIBBLES)
    packed = torch.zeros(rows, cols // NIBBLES, dtype=torch.int64)
    for nibble, channel in enumerate(PACK_ORDER):
        packed |= blocks[:, :, channel] << (BITS * nibble)
    # Words above 2**31 wrap to negative int32, as the C kernels read them.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols / 8] -> uint8 codes [rows, cols], the interleave undone."""
    import torch

    rows, words = packed.shape
    as_int = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(rows, words, NIBBLES, dtype=torch.uint8)
    for nibble, channel in enumerate(PACK_ORDER):
        out[:, :, channel] = ((as_int >> (BITS * nibble)) & 0xF).to(torch.uint8)
    return out.reshape(rows, words * NIBBLES)


def pack(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor
         ) -> dict[str, torch.Tensor]:
    """codes [out, in] (0..15), zeros and scales [out, in / group] -> the three tensors."""
    import torch

    return {"qweight": _pack_columns(codes.t().contiguous()),
            "qzeros": _pack_columns(zeros.t().contiguous()),
            "scales": scales.t().contiguous().to(torch.float16)}


def unpack(qweight: torch.Tensor, qzeros: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [out, in] and zeros [out, in / group], both uint8."""
    return (_unpack_columns(qweight).t().contiguous(),
            _unpack_columns(qzeros).t().contiguous())


def group_size_of(qweight: torch.Tensor, scales: torch.Tensor) -> int:
    """Input columns per scale, from the shapes (a layer may have its own, see quantizer)."""
    return qweight.shape[0] // scales.shape[0]


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
               ) -> torch.Tensor:
    """The fp32 weight [out, in] the packed tensors stand for."""
    import torch

    codes, zeros = unpack(qweight, qzeros)
    group = group_size_of(qweight, scales)
    per_column = scales.t().float().repeat_interleave(group, dim=1)
    zero_columns = zeros.to(torch.float32).repeat_interleave(group, dim=1)
    return (codes.to(torch.float32) - zero_columns) * per_column


def packed_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the modules stored packed in `state` (`<name>.qweight` present)."""
    return sorted(name.removesuffix(".qweight") for name in state if name.endswith(".qweight"))


def dequantize_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every packed module replaced by its fp32 `<name>.weight`."""
    out = {name: tensor for name, tensor in state.items()
           if not name.endswith(tuple(f".{s}" for s in SUFFIXES))}
    for module in packed_modules(state):
        out[f"{module}.weight"] = dequantize(*(state[f"{module}.{s}"] for s in SUFFIXES))
    return out
