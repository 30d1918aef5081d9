"""The server-side proof: Triton's Prometheus metrics (our models' `voice_*` series among them)."""

from __future__ import annotations

import asyncio
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


class Metrics:
    """One scrape of Triton's /metrics."""

    def __init__(self, text: str):
        self.samples = [(s.name, s.labels, s.value)
                        for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`; 0 when there are none."""
        return sum(v for n, l, v in self.samples if n == name and all(l.get(k) == w for k, w in labels.items()))


def scrape(url: str) -> Metrics:
    with urllib.request.urlopen(url, timeout=5) as r:
        return Metrics(r.read().decode())


async def ascrape(url: str) -> Metrics:
    return await asyncio.to_thread(scrape, url)


async def wait_for(url: str, condition, timeout: float = 10.0, interval: float = 0.05) -> Metrics:
    """Scrape until `condition(metrics)` holds; the last scrape either way (check it again to assert)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = await ascrape(url)
        if condition(metrics) or time.monotonic() > deadline:
            return metrics
        await asyncio.sleep(interval)
