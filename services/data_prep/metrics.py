"""data-prep's Prometheus series: the funnel of each prepared dataset, and the PII it found.

Counted once per dataset actually prepared (a stage-cache replay prepares nothing
and counts nothing), from the same `PrepStats` that dataset.prepared carries, so
the dashboard and the run's record cannot disagree.
"""

from __future__ import annotations

from prometheus_client import Counter

from services.data_prep.pii import PII_TYPES
from services.data_prep.prepare import PrepStats

DOCUMENTS_IN = Counter("lmforge_dataprep_documents_in_total", "Records read from datasets.")
DOCUMENTS_OUT = Counter("lmforge_dataprep_documents_out_total",
                        "Documents leaving data-prep: kept (by split) or dropped (by reason "
                        "code, e.g. quality.too_short, near_dup.minhash).", ["outcome", "reason"])
PII_FOUND = Counter("lmforge_dataprep_pii_found_total",
                    "PII spans found and replaced, by type (EMAIL, PHONE, ...).", ["type"])
for _kind in PII_TYPES:  # every known type is a series from the start: 0 is a finding too
    PII_FOUND.labels(_kind)
DATASETS = Counter("lmforge_dataprep_datasets_prepared_total", "Datasets prepared.")

PII_PREFIX = "pii."
NOT_A_PII_TYPE = frozenset({"documents_scrubbed"})
"""pii.* tallies that count documents, not a kind of PII."""


def record_prepared(stats: PrepStats) -> None:
    DATASETS.inc()
    DOCUMENTS_IN.inc(stats.records_read)
    for split, kept in (("train", stats.train_documents), ("heldout", stats.heldout_documents)):
        DOCUMENTS_OUT.labels("kept", split).inc(kept)
    for reason, n in stats.dropped.items():
        DOCUMENTS_OUT.labels("dropped", reason).inc(n)
    for key, n in stats.tallies.items():
        kind = key.removeprefix(PII_PREFIX)
        if key.startswith(PII_PREFIX) and kind not in NOT_A_PII_TYPE:
            PII_FOUND.labels(kind).inc(n)
