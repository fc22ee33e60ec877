from __future__ import annotations

import json

import torch

from lmforge.modeling import (
    dequantize_state_dict,
    load_causal_lm,
    load_dequantized_model,
    load_token_stream,
    perplexity,
)
from services.quantizer.rtn import RtnConfig, quantize_tensor, write_quantized_model


def test_rtn_error_is_bounded_by_half_a_step():
    torch.manual_seed(0)
    weight = torch.randn(32, 256)
    for bits, group in ((8, 0), (8, 128)):
        codes, scales = quantize_tensor(weight, RtnConfig(bits=bits, group_size=group))
        assert codes.dtype == torch.int8
        assert int(codes.max()) <= 2 ** (bits - 1) - 1
        restored = dequantize_state_dict({"w.qcodes": codes, "w.qscales": scales})["w"]
        step = scales.repeat_interleave(256 // scales.shape[1], dim=1)
        assert ((restored - weight).abs() <= step / 2 + 1e-6).all()


def test_int8_keeps_perplexity_and_the_output_reloads(tmp_path, trained_model, prepared_dataset):
    model = load_causal_lm(trained_model.path)
    heldout = load_token_stream(prepared_dataset.path, "heldout")
    seq_len = json.loads((prepared_dataset.path / "dataset.json").read_text())["seq_len"]
    before = perplexity(model, heldout, seq_len=seq_len)
    weights = write_quantized_model(trained_model.path, tmp_path / "q", RtnConfig(bits=8))
    model.load_state_dict(weights)
    after = perplexity(model, heldout, seq_len=seq_len)
    assert abs(after - before) / before < 0.01
    reloaded = perplexity(load_dequantized_model(tmp_path / "q"), heldout, seq_len=seq_len)
    assert reloaded == after
    meta = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert meta["method"] == "rtn-int8"
