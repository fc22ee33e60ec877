"""AWQ beats round-to-nearest where activations have outlier channels, never crashes on
odd widths, and the gate says what it measured, failing or falling back out loud."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lmforge.modeling import llama_config, load_dequantized_model, load_token_stream, perplexity
from services.quantizer.awq import AwqConfig, awq_quantize, calibration_windows
from services.quantizer.int4 import choose_group_size, fake_quantize
from services.quantizer.judged import QualityGateFailed, QuantizeConfig, quantize_and_judge


def _outlier_model(intermediate_size: int = 256, *, inner_outliers: bool = False):
    """A random Llama whose norms make a few input channels 20x larger than the rest:
    the activation outliers AWQ is made for. `inner_outliers`: v and up get outlier
    output channels too, so o and down (whose scales fold into v and up) have outlier
    inputs of their own."""
    torch.manual_seed(0)
    config = llama_config(vocab_size=300, hidden_size=128, num_layers=2, num_heads=4,
                          intermediate_size=intermediate_size, seq_len=64, eos_token_id=0,
                          pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[:: 16] *= 20
            if inner_outliers:
                layer.self_attn.v_proj.weight[:: 16] *= 20
                layer.mlp.up_proj.weight[:: 16] *= 20
    return model


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _rtn(model, group_size):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.ndim == 2:
                p.copy_(fake_quantize(p, choose_group_size(p.shape[1], group_size)))


def _awq(model, ids, group_size):
    result = awq_quantize(model, ids, AwqConfig(group_size=group_size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in result.weights:
                p.copy_(result.weights[name].dequantize())
    return result


def test_awq_output_error_on_calibration_data_is_below_rtn():
    ids = torch.randint(1, 300, (16, 64), generator=torch.Generator().manual_seed(1))
    reference = _logits(_outlier_model(), ids)
    rtn_model, awq_model = _outlier_model(), _outlier_model()
    _rtn(rtn_model, 64)
    result = _awq(awq_model, ids, 64)
    rtn_error = (_logits(rtn_model, ids) - reference).pow(2).mean()
    awq_error = (_logits(awq_model, ids) - reference).pow(2).mean()
    assert len(result.weights) == 2 * 7
    assert any(alpha > 0 for alpha in result.alphas.values())  # scales were chosen
    assert awq_error < 0.7 * rtn_error, (float(awq_error), float(rtn_error))


def test_the_folded_scales_leave_the_fp_model_computing_the_same_function():
    # AWQ only moves magnitude between a Linear's input channels and what produces them
    # (RMSNorm, v_proj, up_proj): before rounding, the model must compute exactly what
    # it did. A scale applied to the wrong axis, or folded into the wrong module, or
    # a v -> o fold under grouped-query attention, changes the logits here.
    ids = torch.randint(1, 300, (8, 64), generator=torch.Generator().manual_seed(3))
    reference = _logits(_outlier_model(inner_outliers=True), ids)
    model = _outlier_model(inner_outliers=True)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = awq_quantize(model, ids, AwqConfig(group_size=64, search_clip=False))
    # Every group chose non-trivial scales, and each fold changed its previous module.
    assert all(alpha > 0 for alpha in result.alphas.values()), result.alphas
    assert len(result.alphas) == 2 * 4
    for changed in ("input_layernorm.weight", "post_attention_layernorm.weight",
                    "self_attn.v_proj.weight", "mlp.up_proj.weight",
                    "self_attn.o_proj.weight", "mlp.down_proj.weight"):
        name = f"model.layers.1.{changed}"
        assert not torch.allclose(dict(model.named_parameters())[name], original[name])
    scaled = _logits(model, ids)
    assert torch.allclose(scaled, reference, rtol=1e-4, atol=1e-4), \
        float((scaled - reference).abs().max())


def test_awq_at_least_halves_rtn_error_at_int3_whole_rows():
    # Whole-row int3 is where round-to-nearest is worst: one scale per row has to cover
    # the outlier columns. AWQ's search must still find its way (the benchmark's coarse
    # settings rely on bits and group 0 reaching every search, not only the final codes).
    ids = torch.randint(1, 300, (16, 64), generator=torch.Generator().manual_seed(1))
    reference = _logits(_outlier_model(inner_outliers=True), ids)
    rtn_model, awq_model = (_outlier_model(inner_outliers=True),
                            _outlier_model(inner_outliers=True))
    with torch.no_grad():
        for name, p in rtn_model.named_parameters():
            if ".layers." in name and p.ndim == 2:
                p.copy_(fake_quantize(p, p.shape[1], bits=3))
    result = awq_quantize(awq_model, ids, AwqConfig(group_size=0, bits=3))
    with torch.no_grad():
        for name, p in awq_model.named_parameters():
            if name in result.weights:
                assert result.weights[name].group_size == p.shape[1]
                assert int(result.weights[name].codes.max()) <= 7
                p.copy_(result.weights[name].dequantize())
    rtn_error = (_logits(rtn_model, ids) - reference).pow(2).mean()
    awq_error = (_logits(awq_model, ids) - reference).pow(2).mean()
    assert awq_error < 0.5 * rtn_error, (float(awq_error), float(rtn_error))


def test_a_layer_of_odd_width_gets_the_largest_group_that_divides_it():
    assert choose_group_size(352, 128) == 32   # the tiny preset's MLP width
    assert choose_group_size(704, 128) == 64   # the small preset's
    assert choose_group_size(2816, 128) == 128
    assert choose_group_size(200, 128) == 100  # no kernel size divides it: a divisor does
    assert choose_group_size(704, 0) == 704    # 0: one group per row (measurement only)
    model = _outlier_model(intermediate_size=200)
    ids = torch.randint(1, 300, (4, 32), generator=torch.Generator().manual_seed(2))
    result = _awq(model, ids, 128)
    assert result.weights["model.layers.0.mlp.down_proj.weight"].group_size == 100
    assert result.weights["model.layers.0.mlp.up_proj.weight"].group_size == 128


def test_calibration_windows_are_bounded_by_the_data():
    tokens = np.arange(1000)
    assert calibration_windows(tokens, samples=64, length=128).shape == (7, 128)
    assert calibration_windows(tokens[:50], samples=64, length=128).shape == (1, 50)
    windows = calibration_windows(tokens, samples=3, length=100, seed=5)
    assert windows.shape == (3, 100) and (windows[:, 1:] - windows[:, :-1] == 1).all()


def test_the_quantized_model_reloads_with_the_perplexity_that_was_measured(
        tmp_path, trained_model, prepared_dataset, caplog):
    with caplog.at_level("WARNING", logger="lmforge.quantizer"):
        outcome = quantize_and_judge(trained_model.path, prepared_dataset.path,
                                     tmp_path / "q",
                                     QuantizeConfig(max_ppl_increase=1.0, calibration_samples=8))
    # test-tiny's 64-wide layers get group 64 and its 160-wide down projections 32: said,
    # with the group that fits all.
    assert "14 layer(s) use 32/64" in caplog.text
    assert "--quantize-group-size 32 gives every layer the same" in caplog.text
    assert outcome.served == "awq-int4" and outcome.passed_quality_gate
    assert outcome.perplexity_fp > 0 and outcome.perplexity_rtn_int4 > 0
    assert outcome.perplexity_method == outcome.perplexity_awq_int4
    heldout = load_token_stream(prepared_dataset.path, "heldout")
    seq_len = json.loads((prepared_dataset.path / "dataset.json").read_text())["seq_len"]
    reloaded = perplexity(load_dequantized_model(tmp_path / "q"), heldout, seq_len=seq_len)
    assert reloaded == pytest.approx(outcome.perplexity_awq_int4, rel=1e-5)
    meta = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert meta["method"] == "awq-int4" and meta["format"] == "awq-gemm"
    assert meta["layer_group_sizes"]["model.layers.0.mlp.down_proj"] == 32  # width 160


def test_a_failed_gate_names_the_figures(tmp_path, trained_model, prepared_dataset):
    with pytest.raises(QualityGateFailed) as failed:
        quantize_and_judge(trained_model.path, prepared_dataset.path, tmp_path / "q",
                           QuantizeConfig(max_ppl_increase=0.0, calibration_samples=8))
    message = str(failed.value)
    assert "quality gate failed" in message and "awq-int4" in message
    for figure in ("fp ", "RTN int4 ", "AWQ int4 "):
        assert figure in message
    assert "LMFORGE_QUANTIZER_ON_GATE_FAILURE=serve-fp" in message


def test_a_failed_gate_with_a_fallback_serves_fp32_and_says_why(
        tmp_path, trained_model, prepared_dataset):
    outcome = quantize_and_judge(
        trained_model.path, prepared_dataset.path, tmp_path / "q",
        QuantizeConfig(method="rtn", max_ppl_increase=0.0, on_gate_failure="serve-fp",
                       compare=False))
    assert not outcome.passed_quality_gate
    assert outcome.served == "fp32" and outcome.perplexity_awq_int4 == 0
    assert "quality gate failed" in outcome.served_reason
    assert "rtn-int4" in outcome.served_reason and "serve-fp" in outcome.served_reason


def test_the_advice_names_a_group_that_fits_every_width():
    from services.quantizer.judged import uniform_group_advice

    assert uniform_group_advice({256, 704}) == "--quantize-group-size 64 gives every layer the same"
    assert uniform_group_advice({96, 64}).startswith("--quantize-group-size 32")
    assert uniform_group_advice({100, 64}) == (
        "no int4 kernel group size divides every width (their greatest common divisor is 4)")
