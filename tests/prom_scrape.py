"""Reading a rank's /metrics page in tests (shared by the metrics and health tests)."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """All samples of a /metrics page, keyed by (name, labels)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples, name: str, **labels) -> float:
    """The one sample of ``name`` whose labels include ``labels``; KeyError otherwise."""
    matches = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    if len(matches) != 1:
        raise KeyError(f"{name} {labels}: {len(matches)} matches")
    return matches[0]
