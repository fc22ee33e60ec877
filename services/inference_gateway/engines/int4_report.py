"""What loading a packed int4 model made of its layers, kept free of torch: the
gateway's parent process reads it from the engine process that loaded the model."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Int4Report:
    """What loading a packed model made of its int4 layers: the gateway says it in
    /v1/models, model.deployed and `lmforge status` (never only in a log line)."""

    layers: int
    """Packed Linears in the model."""
    dequantised: dict[str, str] = field(default_factory=dict)
    """Layers served as plain Linears instead, each with why."""

    def describe(self, dtype: str) -> str:
        """'' when every layer runs int4; else which share does not, and why."""
        if not self.dequantised:
            return ""
        reasons: dict[str, int] = {}
        for why in self.dequantised.values():
            reasons[why] = reasons.get(why, 0) + 1
        why = "; ".join(f"{reason} ({count})" if len(reasons) > 1 else reason
                        for reason, count in reasons.items())
        return (f"{len(self.dequantised)} of {self.layers} int4 layers served dequantised "
                f"to {dtype}: {why}")
