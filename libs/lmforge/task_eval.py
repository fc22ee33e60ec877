"""Task evaluation on a labelled set: exact-match accuracy and macro-F1 of greedy answers.

Perplexity says how well a model predicts held-out text; a user adapting a base
model to a task also wants to know how often it gives the expected answer. The
set is JSONL, one example a line: `prompt` and the expected `answer` (or
`label`). The model answers each prompt greedily (the prompt rendered with the
tokenizer's chat template when it has one), the answer is cut at the first line
break and normalised (case, surrounding space and punctuation), then:

- exact match: the share of answers equal to the expected one;
- macro-F1: F1 per expected label (precision over the answers that named it,
  recall over the examples that expect it), averaged over the labels, so a
  model that always answers the majority label scores low.

Shared by the trainer (full-precision model) and the quantizer (quantized
weights); torch is imported inside the functions.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from lmforge.contracts.v1 import events_pb2 as ev

EVAL_SET = "eval/eval.jsonl"
"""Where data-prep stores a run's eval set inside the dataset directory."""
MAX_EXAMPLES = 1000


class EvalSetError(ValueError):
    """An eval set that cannot be used; the message names the line and what is wrong."""


@dataclass(frozen=True, slots=True)
class EvalExample:
    prompt: str
    answer: str


@dataclass(frozen=True, slots=True)
class TaskEvalResult:
    examples: int
    exact_match: float
    macro_f1: float
    labels: int


def read_eval_set(path: Path) -> list[EvalExample]:
    """The examples of a JSONL eval set, or EvalSetError naming the first bad line."""
    examples: list[EvalExample] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise EvalSetError(f"{path}:{number}: not JSON ({exc})") from None
            answer = record.get("answer", record.get("label")) if isinstance(record,
                                                                              dict) else None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) \
                    or not isinstance(answer, str | int):
                raise EvalSetError(f"{path}:{number}: needs a string 'prompt' and an 'answer' "
                                   "(or 'label')")
            examples.append(EvalExample(record["prompt"], str(answer)))
            if len(examples) > MAX_EXAMPLES:
                raise EvalSetError(f"{path}: more than {MAX_EXAMPLES} examples; each is "
                                   "answered by generation, so keep the set small")
    if not examples:
        raise EvalSetError(f"{path}: no examples")
    return examples


def normalize_answer(text: str) -> str:
    """The first line, lower-cased, without surrounding space and punctuation."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    return first.strip().strip(string.punctuation + " ").casefold()


def score(expected: Sequence[str], predicted: Sequence[str]) -> TaskEvalResult:
    """Exact match and macro-F1 over the expected labels, on normalised strings."""
    truth = [normalize_answer(a) for a in expected]
    guess = [normalize_answer(a) for a in predicted]
    labels = sorted(set(truth))
    f1s = []
    for label in labels:
        tp = sum(t == label and g == label for t, g in zip(truth, guess, strict=True))
        named = sum(g == label for g in guess)
        wanted = sum(t == label for t in truth)
        precision = tp / named if named else 0.0
        recall = tp / wanted
        f1s.append(2 * precision * recall / (precision + recall) if tp else 0.0)
    exact = sum(t == g for t, g in zip(truth, guess, strict=True)) / len(truth)
    return TaskEvalResult(len(truth), exact, sum(f1s) / len(f1s), len(labels))


def evaluate_task(model: torch.nn.Module, tokenizer: Any, examples: Sequence[EvalExample],
                  *, max_new_tokens: int = 16) -> TaskEvalResult:
    """Greedy answers of `model` to each prompt, scored against the expected answers."""
    import torch

    answers = []
    was_training = model.training
    model.eval()
    template = getattr(tokenizer, "chat_template", None)
    with torch.inference_mode():
        for example in examples:
            if template:
                ids = tokenizer.apply_chat_template(
                    [{"role": "user", "content": example.prompt}], add_generation_prompt=True,
                    return_tensors="pt", return_dict=True)["input_ids"]
            else:
                ids = tokenizer(example.prompt, return_tensors="pt")["input_ids"]
            out = model.generate(  # type: ignore[operator]
                                 input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id
                                 if tokenizer.pad_token_id is not None
                                 else tokenizer.eos_token_id)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    model.train(was_training)
    return score([e.answer for e in examples], answers)


class TaskEvalFigures(Protocol):
    """A scored eval: a TaskEvalResult here, or the `TaskEval` message of an event."""

    @property
    def examples(self) -> int: ...
    @property
    def exact_match(self) -> float: ...
    @property
    def macro_f1(self) -> float: ...
    @property
    def labels(self) -> int: ...


FP = "fp"
"""The key of the full-precision model's figures in a `served_figures` report."""


def served_figures(measured: dict[str, TaskEvalFigures], served: str) -> dict[str, Any]:
    """The one shape in which the eval figures of a run leave the services, so that
    `lmforge runs --json`, the export's export.json and the gateway's /v1/models say
    the same thing: {"fp": {...}, "awq-int4": {...}, "served": "awq-int4"}, one entry
    per set of weights that was scored (keyed "fp" or the quantizer's method) and
    `served` naming the entry of the weights that answer requests ("" when those were
    not scored). {} when nothing was measured (the run had no eval set)."""
    report: dict[str, Any] = {
        name: {"examples": r.examples, "exact_match": r.exact_match,
               "macro_f1": r.macro_f1, "labels": r.labels}
        for name, r in measured.items()}
    if report:
        report["served"] = served if served in measured else ""
    return report


def serves_full_precision(event: ev.ModelQuantized) -> bool:
    """Whether the export serves the full-precision model rather than the quantizer's
    weights: the quantizer said "fp32" (a failed gate with the fp fallback asked for),
    or, in an event from before `served` existed, its gate failed."""
    return event.served == "fp32" or not (event.served or event.passed_quality_gate)


def quantized_run_figures(event: ev.ModelQuantized) -> dict[str, Any]:
    """`served_figures` of what model.quantized measured: the fp model and the method's
    weights, and which of the two the export serves."""
    measured: dict[str, TaskEvalFigures] = {}
    if event.HasField("task_eval_fp"):
        measured[FP] = event.task_eval_fp
    if event.HasField("task_eval_quantized"):
        measured[event.method] = event.task_eval_quantized
    return served_figures(measured, FP if serves_full_precision(event) else event.method)
