"""The quantizer's Prometheus series: held-out perplexity by method, per model.

The quality gate compares these numbers; on a dashboard, fp / RTN int4 / AWQ int4
side by side show how much a model lost to quantization and what was served.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PERPLEXITY = Gauge("lmforge_quantizer_perplexity",
                   "Held-out perplexity of the last model quantized, by method (fp, rtn-int4, "
                   "awq-int4).", ["model", "method"])
QUANTIZE_SECONDS = Histogram("lmforge_quantizer_seconds",
                             "Calibration, search and packing time of the method asked for.",
                             buckets=(1, 5, 15, 30, 60, 120, 300, 900, 3600))
GATE = Counter("lmforge_quantizer_gate_total", "Quality gate verdicts.", ["passed"])


def record_quantized(model: str, *, perplexities: dict[str, float], seconds: float,
                     passed: bool) -> None:
    """`perplexities`: method -> value; 0 means not measured and is not exported."""
    for method, value in perplexities.items():
        if value > 0:
            PERPLEXITY.labels(model, method).set(value)
    QUANTIZE_SECONDS.observe(seconds)
    GATE.labels(str(passed).lower()).inc()
