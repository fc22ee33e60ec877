"""`lmforge plan` ranks the catalog's options and says why the others were refused;
`lmforge run`'s flags reach the plan through dataset.ready."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli.main import build_parser, quantization_request, training_request
from lmforge.quantization_request import quantization_overrides
from services.scheduler import plan_command

PLAN_1B = ["--model-size", "1b", "--budget-hours", "4", "--budget-usd", "50",
           "--tokens", "300000000", "--seq-len", "2048", "--vocab-size", "32000",
           "--global-batch", "256", "--types", "gcp-t4,gcp-a2-a100-80gb,aws-p5-h100"]


@pytest.mark.processes
def test_lmforge_plan_json_ranks_options_within_both_budgets(tmp_path: Path):
    data = tmp_path / "corpus.txt"
    data.write_text("some text\n")
    env = {**os.environ, "LMFORGE_HOME": str(tmp_path / "home"),
           "LMFORGE_NATS_URL": "nats://127.0.0.1:1"}
    done = subprocess.run([sys.executable, "-m", "lmforge.cli.main", "plan", str(data),
                           *PLAN_1B, "--json"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    chosen = report["chosen"]
    assert report["ranked"][0] == chosen and chosen["complete"]
    assert chosen["hours"] <= 4 and chosen["usd"] <= 50 and chosen["headroom_gib"] >= 0
    assert [o["usd"] for o in report["ranked"]] == sorted(o["usd"] for o in report["ranked"])
    reasons = {r["option"]: r["reason"] for r in report["refused"]}
    assert "over the $50.00 budget" in reasons["gcp-a2-a100-80gb x8 on-demand"]
    assert "over the 4.00 h budget" in reasons["gcp-t4 x1 spot"]
    assert any("unreachable" in n for n in report["notes"])  # said, not hidden


def test_plan_without_a_fitting_option_exits_1_with_the_reasons(tmp_path, capsys):
    code = plan_command.main([str(tmp_path), "--model-size", "7b", "--tokens", "10000000",
                              "--budget-hours", "1", "--types", "local-cpu", "--no-calibration",
                              "--json"])
    assert code == plan_command.EXIT_NO_PLAN
    error = json.loads(capsys.readouterr().out)["error"]
    assert "local-cpu x1 on-demand: does not fit" in error


def test_plan_estimates_tokens_from_the_data_and_says_so(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("x" * 40_000)
    code = plan_command.main([str(tmp_path), "--budget-hours", "1", "--types", "local-cpu",
                              "--no-calibration", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["request"]["train_tokens"] == 10_000
    assert any("estimated from 40,000 bytes at 4 bytes/token" in n for n in report["notes"])
    assert report["chosen"]["instance_type"] == "local-cpu" and report["chosen"]["usd"] == 0


def test_run_flags_become_the_training_request():
    args = build_parser().parse_args([
        "run", "data.txt", "--model-name", "m", "--model-size", "124m", "--budget-usd", "20",
        "--types", "gcp-t4, gcp-g2-l4", "--family", "qwen2", "--precision", "fp16",
        "--compile", "on", "--grad-accum", "4", "--global-batch", "32", "--market", "spot"])
    request = training_request(args)
    assert (request.model_size, request.budget_usd, list(request.instance_types)) == (
        "124m", 20.0, ["gcp-t4", "gcp-g2-l4"])
    assert (request.family, request.precision, request.compile, request.grad_accum,
            request.global_batch, request.market) == ("qwen2", "fp16", "on", 4, 32, "spot")
    assert training_request(build_parser().parse_args(
        ["run", "data.txt", "--model-name", "m"])).ByteSize() == 0  # nothing asked


def test_base_model_flags_become_the_training_request(tmp_path):
    args = build_parser().parse_args([
        "run", "data.txt", "--model-name", "acme", "--base-model", str(tmp_path / "m"),
        "--adaptation", "lora", "--lora-rank", "16", "--lora-alpha", "32",
        "--lora-dropout", "0", "--lora-targets", "q_proj, v_proj", "--base-weights", "int4",
        "--gradient-checkpointing", "on", "--eval-set", str(tmp_path / "eval.jsonl")])
    request = training_request(args)
    assert request.base_model == str(tmp_path / "m") and request.adaptation == "lora"
    assert (request.lora_rank, request.lora_alpha) == (16, 32.0)
    assert request.HasField("lora_dropout") and request.lora_dropout == 0.0
    assert list(request.lora_targets) == ["q_proj", "v_proj"]
    assert (request.base_weights, request.gradient_checkpointing) == ("int4", "on")
    assert request.eval_set == str(tmp_path / "eval.jsonl")
    unset = training_request(build_parser().parse_args(["run", "d", "--model-name", "m"]))
    assert not unset.base_model and not unset.HasField("lora_dropout")


def test_chat_flags_put_the_template_text_and_packing_in_the_request(tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    request = training_request(build_parser().parse_args([
        "run", "chat.jsonl", "--model-name", "acme", "--chat-template", str(template),
        "--packing", "unpacked"]))
    assert request.chat_template == template.read_text()  # the text: services need no file
    assert request.packing == "unpacked"
    (tmp_path / "empty.jinja").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        training_request(build_parser().parse_args([
            "run", "d", "--model-name", "m", "--chat-template", str(tmp_path / "empty.jinja")]))


def test_quantization_flags_become_the_quantization_request():
    request = quantization_request(build_parser().parse_args([
        "run", "d", "--model-name", "m", "--quantize", "rtn", "--quantize-bits", "8",
        "--quantize-group-size", "64", "--on-quality-gate-failure", "serve-fp",
        "--max-ppl-increase", "0", "--calibration-samples", "16"]))
    assert quantization_overrides(request) == {
        "method": "rtn", "bits": 8, "group_size": 64, "on_gate_failure": "serve-fp",
        "max_ppl_increase": 0.0, "calibration_samples": 16}
    unset = quantization_request(build_parser().parse_args(["run", "d", "--model-name", "m"]))
    assert unset.ByteSize() == 0 and quantization_overrides(unset) == {}
    awq = quantization_request(build_parser().parse_args(
        ["run", "d", "--model-name", "m", "--quantize", "awq"]))
    assert quantization_overrides(awq) == {"method": "awq", "bits": 4}
    with pytest.raises(ValueError, match="--quantize awq is int4 only"):
        quantization_overrides(quantization_request(build_parser().parse_args(
            ["run", "d", "--model-name", "m", "--quantize", "awq", "--quantize-bits", "8"])))
    with pytest.raises(ValueError, match=r"--max-ppl-increase -1\.0 must be >= 0"):
        quantization_overrides(quantization_request(build_parser().parse_args(
            ["run", "d", "--model-name", "m", "--max-ppl-increase", "-1"])))
    with pytest.raises(ValueError, match="--quantize-bits 8 needs --quantize rtn"):
        quantization_overrides(quantization_request(build_parser().parse_args(
            ["run", "d", "--model-name", "m", "--quantize-bits", "8"])))
    from lmforge.contracts.v1 import events_pb2 as ev

    with pytest.raises(ValueError, match="--quantize-group-size 96 must be one of"):
        quantization_overrides(ev.QuantizationRequest(group_size=96))  # dataset.ready


@pytest.mark.parametrize("flags", [["--quantize-group-size", "96"],
                                   ["--calibration-samples", "0"]])
def test_quantization_flags_the_kernels_or_the_search_cannot_take_are_refused(flags, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "d", "--model-name", "m", *flags])
    assert flags[0] in capsys.readouterr().err
