"""The export serves the packed int4 directory as the quantizer wrote it (no fp32 copy),
or fp32 with the quantizer's reason."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from lmforge.contracts.v1 import events_pb2 as ev
from services.exporter.served_weights import write_served_weights
from services.quantizer.judged import QuantizeConfig, quantize_and_judge


@pytest.fixture(scope="module")
def rtn_int4(tmp_path_factory, trained_model, prepared_dataset):
    out = tmp_path_factory.mktemp("q") / "q"
    outcome = quantize_and_judge(trained_model.path, prepared_dataset.path, out,
                                 QuantizeConfig(method="rtn", compare=False,
                                                max_ppl_increase=1.0))
    return out, outcome


def _event(outcome, **overrides):
    fields = dict(method=outcome.method, group_size=128, served=outcome.served,
                  served_reason=outcome.served_reason, weight_format=outcome.weight_format,
                  passed_quality_gate=outcome.passed_quality_gate)
    return ev.ModelQuantized(**{**fields, **overrides})


def test_int4_is_passed_through_packed(tmp_path, trained_model, rtn_int4):
    quantized_dir, outcome = rtn_int4
    served = write_served_weights(_event(outcome), trained_model.path, quantized_dir,
                                  tmp_path / "hf")
    assert (served.precision, served.reason) == ("int4-rtn-g128", "")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.qweight" in names
    assert "model.layers.0.self_attn.q_proj.weight" not in names
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "awq"
    assert (tmp_path / "hf" / "tokenizer.json").exists()


def test_a_fallback_to_fp32_keeps_the_quantizers_reason(tmp_path, trained_model, rtn_int4):
    quantized_dir, outcome = rtn_int4
    event = _event(outcome, served="fp32", passed_quality_gate=False,
                   served_reason="quality gate failed: rtn-int4 ... (serve-fp)")
    served = write_served_weights(event, trained_model.path, quantized_dir, tmp_path / "hf")
    assert served.precision == "fp32" and served.reason.startswith("quality gate failed")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.q_proj.weight" in set(f.keys())
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
