"""The run's eval set scored on the quantized model as served (read back from the
artifact), beside fp, and the quantizer's gate on the exact-match drop."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmforge.modeling import (
    load_causal_lm,
    load_dequantized_model,
    load_token_stream,
    load_tokenizer,
)
from lmforge.task_eval import EVAL_SET, TaskEvalResult, evaluate_task, read_eval_set
from services.quantizer.judged import QuantizeConfig, quantize_and_judge, task_gate_verdict


def _greedy(model, tokenizer, prompt):
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=16, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def dataset_with_own_answers(tmp_path_factory, prepared_dataset, trained_model):
    """The prepared dataset with an eval set whose answers are the fp model's own greedy
    continuations of held-out text, so fp scores exactly 1.0."""
    work = tmp_path_factory.mktemp("eval-ds")
    shutil.copytree(prepared_dataset.path, work / "ds")
    fp, tokenizer = load_causal_lm(trained_model.path), load_tokenizer(trained_model.path)
    heldout = load_token_stream(work / "ds", "heldout")
    prompts = [tokenizer.decode(heldout[s : s + 6].tolist()) for s in range(0, 48, 8)]
    (work / "ds" / EVAL_SET).parent.mkdir(parents=True, exist_ok=True)
    (work / "ds" / EVAL_SET).write_text("".join(
        json.dumps({"prompt": p, "answer": _greedy(fp, tokenizer, p)}) + "\n"
        for p in prompts))
    return work / "ds"


def test_the_quantized_eval_is_the_served_artifacts(tmp_path, trained_model,
                                                    dataset_with_own_answers):
    outcome = quantize_and_judge(trained_model.path, dataset_with_own_answers, tmp_path / "q",
                                 QuantizeConfig(max_ppl_increase=1.0, calibration_samples=8,
                                                max_exact_match_drop=0.0))
    assert outcome.task_eval_fp is not None and outcome.task_eval_fp.exact_match == 1.0
    assert outcome.task_eval_fp.examples == 6
    served = evaluate_task(load_dequantized_model(tmp_path / "q"),
                           load_tokenizer(trained_model.path),
                           read_eval_set(dataset_with_own_answers / EVAL_SET))
    assert outcome.task_eval_quantized == served
    assert outcome.passed_quality_gate == (served.exact_match == 1.0)


def test_the_gate_refuses_an_exact_match_drop_past_the_setting():
    fp, quantized = TaskEvalResult(8, 1.0, 1.0, 8), TaskEvalResult(8, 0.75, 0.7, 8)
    passed, figures = task_gate_verdict(QuantizeConfig(max_exact_match_drop=0.2), fp,
                                        quantized)
    assert not passed
    assert figures.startswith("awq-int4 eval-set exact match 0.750 is -0.250 against fp 1.000")
    assert "LMFORGE_QUANTIZER_MAX_EXACT_MATCH_DROP" in figures
    assert task_gate_verdict(QuantizeConfig(max_exact_match_drop=0.25), fp, quantized)[0]
    assert task_gate_verdict(QuantizeConfig(), fp, quantized) == (True, "")  # reported only
    assert task_gate_verdict(QuantizeConfig(max_exact_match_drop=0.0), None, None) == (True, "")
    with pytest.raises(ValueError, match="max_exact_match_drop"):
        QuantizeConfig(max_exact_match_drop=1.5)
