"""Reading a few series from a service's Prometheus /metrics page, for `lmforge status`.

prometheus-client's own text parser does the parsing; this only fetches the page
and keeps the samples of the families asked for.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[dict[str, str], float]


def read_samples(url: str, names: Iterable[str], *, timeout_s: float) -> dict[str, list[Sample]]:
    """(labels, value) of every sample named in `names` (a counter's `_total` included).

    Raises OSError when the page cannot be fetched.
    """
    wanted = set(names)
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    found: dict[str, list[Sample]] = {name: [] for name in wanted}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                found[sample.name].append((dict(sample.labels), float(sample.value)))
    return found
