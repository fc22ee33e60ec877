"""The packed int4 files read back, with an unpacker written from AutoAWQ's layout
description (not from lmforge's packer), as exactly the codes that were quantized."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.numpy import load_file

from services.quantizer.int4 import quantize
from services.quantizer.packed_model import write_int4_model

# AutoAWQ GEMM: qweight is [in, out/8] int32; within each 32-bit word, the 4-bit field
# at bits 4i..4i+3 holds output column 8*word + ORDER[i], ORDER = 0 2 4 6 1 3 5 7.
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def reference_unpack(packed: np.ndarray) -> np.ndarray:
    """[rows, words] int32 -> [rows, words*8] codes, one word and nibble at a time."""
    rows, words = packed.shape
    out = np.zeros((rows, words * 8), dtype=np.int64)
    for r in range(rows):
        for w in range(words):
            word = int(packed[r, w]) & 0xFFFFFFFF
            for i in range(8):
                out[r, 8 * w + ORDER[i]] = (word >> (4 * i)) & 0xF
    return out


def _model_dir(tmp_path, state):
    source = tmp_path / "fp"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (source / "tokenizer.json").write_text("{}")
    return source


def test_reference_unpacker_reads_back_exactly_the_quantized_codes(tmp_path):
    torch.manual_seed(0)
    name = "model.layers.0.mlp.down_proj.weight"
    weight = torch.randn(48, 352) * torch.linspace(0.1, 3, 352)  # 352: not a multiple of 128
    norm = torch.ones(352)
    quantized = quantize(weight, 32)
    state = {name: weight, "model.norm.weight": norm}
    groups = write_int4_model(_model_dir(tmp_path, state), tmp_path / "q", state,
                              {name: quantized}, group_size=128, metadata={})
    files = load_file(str(tmp_path / "q" / "model.safetensors"))
    module = name.removesuffix(".weight")
    assert f"{module}.weight" not in files
    qweight, qzeros, scales = (files[f"{module}.{s}"] for s in ("qweight", "qzeros", "scales"))
    assert qweight.dtype == np.int32 and qweight.shape == (352, 48 // 8)
    assert qzeros.dtype == np.int32 and qzeros.shape == (352 // 32, 48 // 8)
    assert scales.dtype == np.float16 and scales.shape == (352 // 32, 48)
    # Codes are stored transposed ([in, out]); zeros and scales are [groups, out].
    np.testing.assert_array_equal(reference_unpack(qweight).T, quantized.codes.numpy())
    np.testing.assert_array_equal(reference_unpack(qzeros).T, quantized.zeros.numpy())
    np.testing.assert_array_equal(scales.T.astype(np.float32), quantized.scales.numpy())
    np.testing.assert_array_equal(files["model.norm.weight"], norm.numpy())
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert {k: config[k] for k in ("quant_method", "bits", "group_size", "zero_point",
                                   "version")} == {"quant_method": "awq", "bits": 4,
                                                   "group_size": 128, "zero_point": True,
                                                   "version": "gemm"}
    assert groups == {module: 32} and config["lmforge_group_sizes"] == {module: 32}
    assert (tmp_path / "q" / "tokenizer.json").exists()


def test_int4_weight_bytes_are_under_three_tenths_of_bf16(tmp_path):
    torch.manual_seed(1)
    state = {f"model.layers.0.mlp.{n}.weight": torch.randn(256, 512) for n in ("up", "gate")}
    state["model.layers.0.mlp.down_proj.weight"] = torch.randn(512, 352)  # group 32 here
    quantized = {name: quantize(w, 128 if w.shape[1] % 128 == 0 else 32)
                 for name, w in state.items()}
    write_int4_model(_model_dir(tmp_path, state), tmp_path / "q", state, quantized,
                     group_size=128, metadata={})
    files = load_file(str(tmp_path / "q" / "model.safetensors"))
    packed_bytes = sum(array.nbytes for array in files.values())
    bf16_bytes = sum(w.numel() * 2 for w in state.values())
    assert packed_bytes <= 0.3 * bf16_bytes
