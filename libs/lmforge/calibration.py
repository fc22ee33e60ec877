"""Measured throughput, written by the trainer and read by the next plan.

Before its first step the trainer times a few forward/backward passes of the
planned model on its device and publishes the achieved FLOP/s per device in
`training.progress`; it also stores them here, in a JetStream key-value bucket
(`Bucket.THROUGHPUT`) keyed by the plan's instance type and precision, so that
the next plan for that type uses the measured figure instead of the catalog's.
A measurement on one model size is carried to another by the catalog's size
law (see `InstanceType.size_exponent`), and a checkpoint's measured cost
(seconds per GB) replaces the catalog's write rate in the Young/Daly interval.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

_KEY_UNSAFE = re.compile(r"[^-/_=.a-zA-Z0-9]")


@dataclass(frozen=True, slots=True, kw_only=True)
class Calibration:
    instance_type: str
    precision: str
    flops_per_device: float
    """Achieved training FLOP/s of one device (6·N + 12·L·H·T per token)."""
    hidden_size: int
    """Of the model measured (the size law carries the figure to other sizes)."""
    compiled: bool
    zero_stage: int
    measured_at_unix: float
    how: str
    """How it was measured, in words."""
    checkpoint_gb_per_s: float = 0.0
    """Measured checkpoint write rate (GB of checkpoint per second); 0 = not measured."""

    @property
    def key(self) -> str:
        return calibration_key(self.instance_type, self.precision)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Calibration:
        return cls(**json.loads(data))


def calibration_key(instance_type: str, precision: str) -> str:
    """A key NATS accepts: the type and precision, unsafe characters replaced."""
    return _KEY_UNSAFE.sub("_", f"{instance_type}.{precision}")
