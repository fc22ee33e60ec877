"""Quantize a trained model, measure it against full precision and round-to-nearest,
and decide what is served: the quantizer's domain entry point (no NATS here).

Why three perplexities: a quantizer's number alone says nothing. The held-out
perplexity of the fp model, of round-to-nearest int4 and of AWQ int4 (same group
size) show both the cost of 4 bits and what AWQ buys over the baseline; all three
ride in model.quantized.

The gate: the method asked for must keep held-out perplexity within
`max_ppl_increase` of fp. When it does not, the run fails with the figures
(`QualityGateFailed`, a stage.failed), unless the run or the service asked for a
fallback (`on_gate_failure = "serve-fp"`): then the artifact still holds the
quantized model, but `served` is "fp32" and `served_reason` says why, for the
exporter, the gateway, `lmforge runs` and the logs to repeat.

The run's labelled eval set, when it has one (data-prep stores it in the
dataset), is scored twice here: on the fp model and on the quantized weights as
written to the artifact (int4: read back from the packed AWQ GEMM tensors, so
the figure is the served codes', not the quantizer's in-memory copy). Both ride
in model.quantized. With `max_exact_match_drop` set, the gate also refuses a
quantized model whose exact match falls more than that (absolute) below fp's:
a perplexity within 5% can still hide a task the model no longer answers.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.failures import BadInput
from lmforge.modeling import (
    load_causal_lm,
    load_dequantized_model,
    load_token_stream,
    load_tokenizer,
    perplexity,
)
from lmforge.task_eval import EVAL_SET, TaskEvalResult, evaluate_task, read_eval_set
from services.quantizer.awq import AwqConfig, awq_quantize, calibration_windows
from services.quantizer.int4 import KERNEL_GROUP_SIZES, Int4Weight, choose_group_size, quantize
from services.quantizer.packed_model import packable, write_int4_model
from services.quantizer.rtn import RtnConfig, quantizable, write_quantized_model

log = logging.getLogger("lmforge.quantizer")

METHODS = ("awq", "rtn")
GATE_FAILURE_ACTIONS = ("fail", "serve-fp")


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantizeConfig:
    method: str = "awq"
    """"awq" (int4 only) or "rtn" (round-to-nearest, int4 or int8)."""
    bits: int = 4
    group_size: int = 128
    """Input columns per int4 scale; a layer it does not divide gets its own (int4.py)."""
    max_ppl_increase: float = 0.05
    """The gate: largest relative held-out perplexity increase over fp accepted."""
    on_gate_failure: str = "fail"
    """"fail": stage.failed naming the figures; "serve-fp": serve fp32 and say so."""
    calibration_samples: int = 64
    """AWQ calibration windows drawn from the run's training split (fewer if it is small)."""
    calibration_length: int = 0
    """Tokens per calibration window; 0 = the dataset's sequence length."""
    compare: bool = True
    """Measure the other int4 method too (RTN beside AWQ, AWQ beside RTN)."""
    max_exact_match_drop: float | None = None
    """The gate on the eval set: largest absolute exact-match drop from fp accepted (0.05 =
    five points); None: the eval set is reported, not gated."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} must be one of {METHODS}")
        if self.bits not in (4, 8):
            raise ValueError(f"bits {self.bits} must be 4 or 8")
        if self.method == "awq" and self.bits != 4:
            raise ValueError("AWQ is int4 only (bits 4); int8 is round-to-nearest (method rtn)")
        if self.group_size <= 0:
            raise ValueError(f"group_size {self.group_size} must be positive")
        if self.on_gate_failure not in GATE_FAILURE_ACTIONS:
            raise ValueError(f"on_gate_failure {self.on_gate_failure!r} must be one of "
                             f"{GATE_FAILURE_ACTIONS}")
        if self.max_exact_match_drop is not None and not 0 <= self.max_exact_match_drop <= 1:
            raise ValueError(f"max_exact_match_drop {self.max_exact_match_drop} must be in "
                             "[0, 1]")
        if self.calibration_samples < 1 or self.calibration_length < 0:
            raise ValueError("calibration_samples must be >= 1 and calibration_length >= 0")

    @property
    def method_name(self) -> str:
        return f"{self.method}-int{self.bits}"


class QualityGateFailed(BadInput):
    """The quantized model lost more held-out perplexity than the gate allows."""


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantizationOutcome:
    method: str
    perplexity_fp: float
    perplexity_rtn_int4: float
    """0 when not measured."""
    perplexity_awq_int4: float
    """0 when not measured."""
    perplexity_method: float
    passed_quality_gate: bool
    served: str
    """`method`, or "fp32" when the gate failed and a fallback was asked for."""
    served_reason: str
    weight_format: str
    seconds: float
    """Time to produce `method`'s weights (calibration, search, quantization)."""
    task_eval_fp: TaskEvalResult | None = None
    """The run's eval set on the fp model (None: the run has none)."""
    task_eval_quantized: TaskEvalResult | None = None
    """... and on `method`'s weights as written."""


def gate_verdict(config: QuantizeConfig, fp: float, quantized: float) -> tuple[bool, str]:
    """(passed, the sentence that says so with the figures)."""
    increase = quantized / fp - 1
    passed = increase <= config.max_ppl_increase
    figures = (f"{config.method_name} held-out perplexity {quantized:.3f} is "
               f"{increase:+.1%} against fp {fp:.3f} (gate: at most "
               f"+{config.max_ppl_increase:.1%}: lmforge run --max-ppl-increase or "
               "LMFORGE_QUANTIZER_MAX_PPL_INCREASE)")
    return passed, figures


def task_gate_verdict(config: QuantizeConfig, fp: TaskEvalResult | None,
                      quantized: TaskEvalResult | None) -> tuple[bool, str]:
    """(passed, the sentence with the figures) for the eval-set part of the gate; passes
    with no sentence where there is no eval set or no such gate."""
    if fp is None or quantized is None or config.max_exact_match_drop is None:
        return True, ""
    drop = fp.exact_match - quantized.exact_match
    return drop <= config.max_exact_match_drop, (
        f"{config.method_name} eval-set exact match {quantized.exact_match:.3f} is "
        f"{-drop:+.3f} against fp {fp.exact_match:.3f} (gate: at most -"
        f"{config.max_exact_match_drop:.3f}, LMFORGE_QUANTIZER_MAX_EXACT_MATCH_DROP)")


def uniform_group_advice(widths: set[int]) -> str:
    """Which group size would give every layer of these input widths the same group."""
    common = math.gcd(*widths)
    fitting = [size for size in KERNEL_GROUP_SIZES if common % size == 0]
    if fitting:
        return f"--quantize-group-size {fitting[0]} gives every layer the same"
    return (f"no int4 kernel group size divides every width (their greatest common "
            f"divisor is {common})")


def _rtn_int4(state: dict[str, torch.Tensor], group_size: int) -> dict[str, Int4Weight]:
    return {name: quantize(tensor, choose_group_size(tensor.shape[1], group_size))
            for name, tensor in state.items() if quantizable(name, tensor) and packable(tensor)}


def _perplexity_with(model: torch.nn.Module, base: dict[str, torch.Tensor],
                     weights: dict[str, Int4Weight], heldout, seq_len: int) -> float:
    model.load_state_dict({**base, **{n: w.dequantize() for n, w in weights.items()}})
    return perplexity(model, heldout, seq_len=seq_len)


def quantize_and_judge(model_dir: Path, dataset_dir: Path, out_dir: Path,
                       config: QuantizeConfig) -> QuantizationOutcome:
    """Write the quantized model of `model_dir` into `out_dir` and judge it on the
    held-out split of `dataset_dir`; raises QualityGateFailed when it fails the gate
    and no fallback was asked for."""
    seq_len = json.loads((dataset_dir / "dataset.json").read_text())["seq_len"]
    heldout = load_token_stream(dataset_dir, "heldout")
    model = load_causal_lm(model_dir)
    fp_state = {k: v.clone() for k, v in model.state_dict().items()}
    fp = perplexity(model, heldout, seq_len=seq_len)
    rtn4 = awq4 = 0.0
    started = time.perf_counter()
    if config.bits == 8:
        model.load_state_dict(write_quantized_model(model_dir, out_dir, RtnConfig(bits=8)))
        seconds = time.perf_counter() - started
        chosen = perplexity(model, heldout, seq_len=seq_len)
        weight_format = "lmforge-qcodes"
    else:
        awq_weights: dict[str, Int4Weight] = {}
        awq_state: dict[str, torch.Tensor] = {}
        awq_seconds = 0.0
        if config.method == "awq" or config.compare:
            train = load_token_stream(dataset_dir, "train")
            calibration = calibration_windows(
                train, samples=config.calibration_samples,
                length=config.calibration_length or seq_len)
            model.load_state_dict(fp_state)
            result = awq_quantize(model, calibration, AwqConfig(group_size=config.group_size))
            awq_state = {k: v.clone() for k, v in model.state_dict().items()}
            awq_weights = {n: w for n, w in result.weights.items() if packable(awq_state[n])}
            awq4 = _perplexity_with(model, awq_state, awq_weights, heldout, seq_len)
            awq_seconds = result.seconds
            log.info("AWQ int4 on %d calibration windows of %d tokens: %.1f s",
                     len(calibration), calibration.shape[1], result.seconds)
        rtn_weights: dict[str, Int4Weight] = {}
        rtn_seconds = 0.0
        if config.method == "rtn" or config.compare:
            rtn_started = time.perf_counter()
            rtn_weights = _rtn_int4(fp_state, config.group_size)
            rtn_seconds = time.perf_counter() - rtn_started
            rtn4 = _perplexity_with(model, fp_state, rtn_weights, heldout, seq_len)
        if config.method == "awq":
            state, weights, chosen, seconds = awq_state, awq_weights, awq4, awq_seconds
        else:
            state, weights, chosen, seconds = fp_state, rtn_weights, rtn4, rtn_seconds
        groups = write_int4_model(
            model_dir, out_dir, state, weights, group_size=config.group_size,
            metadata={"method": config.method_name, "perplexity_fp": fp,
                      "perplexity_rtn_int4": rtn4, "perplexity_awq_int4": awq4})
        if odd := sorted({size for size in groups.values() if size != config.group_size}):
            log.warning("int4 group size %d does not divide every width: %d layer(s) use %s "
                        "(lmforge_group_sizes in config.json). lmforge serves it; vLLM, TGI "
                        "and transformers take one group size per model and refuse those "
                        "layers. %s", config.group_size,
                        sum(s != config.group_size for s in groups.values()),
                        "/".join(map(str, odd)),
                        uniform_group_advice({w.codes.shape[1] for w in weights.values()}))
        weight_format = "awq-gemm"
    task_fp = task_quantized = None
    if (dataset_dir / EVAL_SET).is_file():
        examples = read_eval_set(dataset_dir / EVAL_SET)
        tokenizer = load_tokenizer(model_dir)
        model.load_state_dict(fp_state)
        task_fp = evaluate_task(model, tokenizer, examples)
        # Read back from the artifact: the codes as written are what the gateway serves.
        task_quantized = evaluate_task(load_dequantized_model(out_dir), tokenizer, examples)
        log.info("eval set: exact match fp %.3f, %s %.3f", task_fp.exact_match,
                 config.method_name, task_quantized.exact_match)
    passed, figures = gate_verdict(config, fp, chosen)
    task_passed, task_figures = task_gate_verdict(config, task_fp, task_quantized)
    if not task_passed:
        passed, figures = False, (figures + "; " + task_figures if not passed
                                  else task_figures)
    elif task_figures:
        figures = figures + "; " + task_figures
    served, reason = config.method_name, ""
    if not passed:
        if config.on_gate_failure == "fail":
            raise QualityGateFailed(
                f"quality gate failed: {figures}; fp {fp:.3f}, RTN int4 "
                f"{rtn4 or float('nan'):.3f}, AWQ int4 {awq4 or float('nan'):.3f}. To serve fp32 "
                "instead run with --on-quality-gate-failure serve-fp (every run: "
                "LMFORGE_QUANTIZER_ON_GATE_FAILURE=serve-fp); to accept more, raise "
                "--max-ppl-increase (LMFORGE_QUANTIZER_MAX_PPL_INCREASE)")
        served, reason = "fp32", f"quality gate failed: {figures}; serving fp32 as asked " \
                                 "(on quality-gate failure: serve-fp)"
        log.warning("%s", reason)
    log.info("held-out perplexity: fp %.3f, RTN int4 %.3f, AWQ int4 %.3f; %s; serving %s",
             fp, rtn4, awq4, "gate passed" if passed else "gate FAILED", served)
    return QuantizationOutcome(
        method=config.method_name, perplexity_fp=fp, perplexity_rtn_int4=rtn4,
        perplexity_awq_int4=awq4, perplexity_method=chosen, passed_quality_gate=passed,
        served=served, served_reason=reason, weight_format=weight_format, seconds=seconds,
        task_eval_fp=task_fp, task_eval_quantized=task_quantized)
