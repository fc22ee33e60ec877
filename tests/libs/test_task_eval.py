"""Task evaluation: exact match and macro-F1 on normalised answers; bad sets named by line."""

from __future__ import annotations

import pytest

from lmforge.task_eval import EvalSetError, read_eval_set, score


def test_macro_f1_averages_per_label_f1_so_the_majority_answer_scores_low():
    expected = ["yes", "yes", "yes", "no"]
    always_yes = score(expected, ["Yes.", "yes", " YES", "yes"])
    assert always_yes.exact_match == 0.75 and always_yes.labels == 2
    # yes: P 3/4, R 1 -> F1 6/7; no: never named -> 0; macro = 3/7.
    assert always_yes.macro_f1 == pytest.approx(3 / 7)
    perfect = score(expected, ["yes", "yes\nbecause", "yes!", "No"])
    assert (perfect.exact_match, perfect.macro_f1) == (1.0, 1.0)
    # An answer outside the label set is wrong for its example and names no label.
    off = score(["a", "b"], ["a", "maybe"])
    assert off.exact_match == 0.5 and off.macro_f1 == pytest.approx((1.0 + 0.0) / 2)


def test_an_eval_set_line_without_prompt_or_answer_is_named(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"prompt": "2+2?", "answer": "4"}\n{"prompt": "x"}\n')
    with pytest.raises(EvalSetError, match=r"eval\.jsonl:2: needs a string 'prompt' and an "
                                           r"'answer'"):
        read_eval_set(path)
    path.write_text('{"prompt": "2+2?", "label": 4}\n')
    assert read_eval_set(path)[0].answer == "4"
