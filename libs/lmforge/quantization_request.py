"""A run's own quantization choices (`lmforge run --quantize ...`, dataset.ready's
`quantization`), checked where the run enters and carried to the quantizer.

Why they travel inside the dataset artifact: the quantizer reads the run's dataset
anyway (calibration windows, held-out split, eval set), and no event between
data-prep and the quantizer has to learn about them. data-prep checks the request
when the run arrives, so a bad value fails in seconds with the flag's name, not
after hours of training, and writes the checked overrides to REQUEST_FILE beside
the shards; the quantizer lays them over its service-wide settings.

Each field left at its zero value keeps the quantizer's setting
(LMFORGE_QUANTIZER_*); the CLI refuses an explicit 0. `awq` implies 4 bits, and 8
bits needs `rtn` said explicitly.

The cost of this design: the request is part of the dataset's bytes, so a new run
on the same data that changes only these choices prepares and trains again (the
trainer's cache is keyed on the dataset). Re-quantizing an existing model without
training is not offered yet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REQUEST_FILE = "quantization_request.json"
METHODS = ("awq", "rtn")
GATE_FAILURE_ACTIONS = ("fail", "serve-fp")
KERNEL_GROUPS = (32, 64, 128, 256)
"""Group sizes a run may ask for: those torch's int4 CPU and CUDA kernels take (the
service setting may be any; a layer the kernel cannot take is served dequantised)."""


def quantization_overrides(request: Any) -> dict[str, Any]:
    """The QuantizeConfig fields a QuantizationRequest message sets, checked; ValueError
    naming the `lmforge run` flag otherwise."""
    overrides: dict[str, Any] = {}
    if request.method:
        if request.method not in METHODS:
            raise ValueError(f"--quantize {request.method!r} must be one of {METHODS}")
        overrides["method"] = request.method
    if request.bits:
        if request.bits not in (4, 8):
            raise ValueError(f"--quantize-bits {request.bits} must be 4 or 8")
        overrides["bits"] = request.bits
    if overrides.get("method") == "awq":
        if overrides.get("bits", 4) != 4:
            raise ValueError("--quantize awq is int4 only: --quantize-bits 8 needs "
                             "--quantize rtn")
        overrides["bits"] = 4
    elif overrides.get("bits") == 8 and "method" not in overrides:
        raise ValueError("--quantize-bits 8 needs --quantize rtn (AWQ is int4 only)")
    if request.group_size:
        if request.group_size not in KERNEL_GROUPS:
            raise ValueError(f"--quantize-group-size {request.group_size} must be one of "
                             f"{KERNEL_GROUPS} (the groups the int4 kernels serve)")
        overrides["group_size"] = request.group_size
    if request.on_gate_failure:
        if request.on_gate_failure not in GATE_FAILURE_ACTIONS:
            raise ValueError(f"--on-quality-gate-failure {request.on_gate_failure!r} must be "
                             f"one of {GATE_FAILURE_ACTIONS}")
        overrides["on_gate_failure"] = request.on_gate_failure
    if request.HasField("max_ppl_increase"):
        if not request.max_ppl_increase >= 0:
            raise ValueError(f"--max-ppl-increase {request.max_ppl_increase} must be >= 0")
        overrides["max_ppl_increase"] = request.max_ppl_increase
    if request.calibration_samples:
        if request.calibration_samples < 0:
            raise ValueError(f"--calibration-samples {request.calibration_samples} must be "
                             "positive")
        overrides["calibration_samples"] = request.calibration_samples
    return overrides


def write_overrides(dataset_dir: Path, overrides: dict[str, Any]) -> None:
    """Store a run's checked overrides beside its dataset (nothing when there are none)."""
    if overrides:
        (dataset_dir / REQUEST_FILE).write_text(json.dumps(overrides, sort_keys=True))


def read_overrides(dataset_dir: Path) -> dict[str, Any]:
    """The run's overrides stored with its dataset; {} when it asked for none."""
    path = dataset_dir / REQUEST_FILE
    if not path.exists():
        return {}
    overrides = json.loads(path.read_text())
    if not isinstance(overrides, dict):
        raise ValueError(f"{path}: not a JSON object")
    return overrides
