"""Shared by the reliability tests that run a real `deepserve serve` process.

    tiny_model, serve_process       the fixtures of tests/e2e/conftest.py (re-exported, not copied)
    scrape(url)                     GET /metrics -> Samples (Prometheus text format, parsed)
    samples.value(name, **labels)   one series, `deepserve:` prefix and model_name label implied
    engine_gauges(url)              (running, waiting, kv_cache_usage) from one /metrics scrape
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import MODEL_NAME, serve_process, tiny_model  # noqa: F401 - fixtures


class Samples(dict):
    """{(sample name, sorted label items): value} of one scrape."""

    def value(self, name: str, **labels: str) -> float:
        key = (f"deepserve:{name}", tuple(sorted((labels | {"model_name": MODEL_NAME}).items())))
        assert key in self, f"no series {key} in /metrics"
        return self[key]


def scrape(url: str, timeout: float = 10) -> Samples:
    resp = httpx.get(f"{url}/metrics", timeout=timeout)
    assert resp.status_code == 200, resp.text
    return Samples({(s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(resp.text) for s in family.samples})


def engine_gauges(url: str) -> tuple[float, float, float]:
    samples = scrape(url)
    return tuple(samples.value(name) for name in
                 ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"))
