"""Every Int4Linear checks the kernel against the dequantised weight when it is built:
the CUDA path (tinygemm) has not run on hardware here, and a packing mistake must
cost a layer its int4 speed, not the model its output."""

from __future__ import annotations

import pytest
import torch

from lmforge import awq_gemm
from services.inference_gateway.engines.int4_model import (
    Int4KernelError,
    Int4Linear,
    kernel_takes,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
    reason="tinygemm needs a CUDA device of sm_80 or newer"))]


def _packed(out_features: int, in_features: int, group: int, seed: int = 0
            ) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_features, in_features), generator=generator,
                          dtype=torch.uint8)
    zeros = torch.randint(0, 16, (out_features, in_features // group), generator=generator,
                          dtype=torch.uint8)
    scales = torch.rand(out_features, in_features // group, generator=generator) * 0.02 + 0.01
    return awq_gemm.pack(codes, zeros, scales)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("out_features", "in_features", "group"),
                         [(64, 256, 128), (256, 704, 64), (48, 128, 32)])
def test_the_kernel_computes_what_the_dequantised_weight_does(device, out_features,
                                                               in_features, group):
    if not kernel_takes(out_features, in_features, group, device):
        pytest.skip(f"{out_features}x{in_features} g{group} is not the {device} kernel's")
    files = _packed(out_features, in_features, group)
    linear = Int4Linear(files["qweight"], files["qzeros"], files["scales"], device=device)
    weight = awq_gemm.dequantize(files["qweight"], files["qzeros"], files["scales"])
    linear.check_against(weight)
    x = torch.randn(3, 5, in_features)
    got = linear(x.to(device)).float().cpu()
    expected = x.to(torch.bfloat16).float() @ weight.t()
    assert got.shape == (3, 5, out_features)
    assert float((got - expected).abs().max()) < 1e-2 * float(expected.abs().max())


def test_a_kernel_that_computes_another_weight_is_refused():
    files = _packed(64, 256, 128)
    linear = Int4Linear(files["qweight"], files["qzeros"], files["scales"])
    codes, zeros = awq_gemm.unpack(files["qweight"], files["qzeros"])
    # The nibbles of each byte pair swapped: the mistake a wrong packer would make.
    swapped = codes.clone()
    swapped[:, ::2], swapped[:, 1::2] = codes[:, 1::2], codes[:, ::2]
    wrong = awq_gemm.pack(swapped, zeros, files["scales"].t().float())
    with pytest.raises(Int4KernelError, match="differs from the dequantised weight"):
        linear.check_against(awq_gemm.dequantize(wrong["qweight"], wrong["qzeros"],
                                                 wrong["scales"]))


def test_each_kernel_says_which_shapes_it_takes():
    assert kernel_takes(704, 256, 128, "cpu") and kernel_takes(704, 256, 128, "cuda")
    assert not kernel_takes(40, 256, 128, "cpu") and kernel_takes(40, 256, 128, "cuda")
    assert kernel_takes(256, 704, 64, "cuda")      # 704 = 11 x 4 k-tiles of 16
    assert not kernel_takes(256, 720, 48, "cpu")   # group 48: neither kernel's
    assert not kernel_takes(256, 336, 16, "cuda")
    with pytest.raises(Int4KernelError, match="CPU kernel cannot take its shape: 40x256"):
        files = _packed(40, 256, 128)
        Int4Linear(files["qweight"], files["qzeros"], files["scales"])
