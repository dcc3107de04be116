"""Reading a /metrics scrape: parsed with prometheus_client's own parser, looked up by labels."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .conftest import ProxyProcess

T = TypeVar("T")

PREFIX = "canary_proxy_"

# The contract's table: every family and the only labels it may carry. ``le`` belongs to the
# histogram buckets and is not a label of ours.
LABELS: dict[str, frozenset[str]] = {
    "canary_proxy_requests": frozenset({"route", "version", "code", "method"}),
    "canary_proxy_request_duration_seconds": frozenset({"route", "version"}),
    "canary_proxy_upstream_errors": frozenset({"route", "version", "reason"}),
    "canary_proxy_routing_decisions": frozenset({"route", "version", "rule"}),
    "canary_proxy_in_flight_requests": frozenset({"route", "version"}),
    "canary_proxy_websocket_connections": frozenset({"route", "version"}),
    "canary_proxy_canary_weight_ratio": frozenset({"route"}),
    "canary_proxy_config_reloads": frozenset({"result"}),
    "canary_proxy_config_last_success_timestamp_seconds": frozenset(),
    "canary_proxy_worker_restarts": frozenset(),
    "canary_proxy_outlier_ejections": frozenset({"route"}),
    "canary_proxy_mirror_requests": frozenset({"route", "code"}),
    "canary_proxy_mirror_request_duration_seconds": frozenset({"route"}),
    "canary_proxy_mirror_skipped": frozenset({"reason"}),
    "canary_proxy_tls_secret_problem": frozenset({"secret", "reason"}),
}
TYPES: dict[str, str] = {
    "canary_proxy_requests": "counter",
    "canary_proxy_request_duration_seconds": "histogram",
    "canary_proxy_upstream_errors": "counter",
    "canary_proxy_routing_decisions": "counter",
    "canary_proxy_in_flight_requests": "gauge",
    "canary_proxy_websocket_connections": "gauge",
    "canary_proxy_canary_weight_ratio": "gauge",
    "canary_proxy_config_reloads": "counter",
    "canary_proxy_config_last_success_timestamp_seconds": "gauge",
    "canary_proxy_worker_restarts": "counter",
    "canary_proxy_outlier_ejections": "counter",
    "canary_proxy_mirror_requests": "counter",
    "canary_proxy_mirror_request_duration_seconds": "histogram",
    "canary_proxy_mirror_skipped": "counter",
    "canary_proxy_tls_secret_problem": "gauge",
}

Key = tuple[str, frozenset[tuple[str, str]]]


@dataclass
class Scrape:
    text: str
    families: dict[str, Metric]
    samples: dict[Key, float]

    def get(self, name: str, **labels: str) -> float | None:
        """One sample. A family with a ``route`` label is read for the ``default`` route (the
        lone catch-all route of a single-pair config) unless ``route`` is given."""
        if "route" not in labels and "route" in LABELS.get(_family(name), ()):
            labels = {"route": "default", **labels}
        return self.samples.get((name, frozenset(labels.items())))

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; a missing series fails with the names that do exist."""
        found = self.get(name, **labels)
        if found is None:
            near = sorted(str(dict(k[1])) for k in self.samples if k[0] == name)
            raise AssertionError(f"no sample {name}{labels}; {name} has {near}")
        return found

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        """Every series of one sample name (e.g. ``canary_proxy_requests_total``)."""
        return {labels: v for (n, labels), v in self.samples.items() if n == name}

    def nonzero(self, name: str, *label_names: str) -> dict[tuple[str, ...], float]:
        """Non-zero series of ``name`` keyed by the values of ``label_names`` in that order."""
        return {
            tuple(dict(labels)[n] for n in label_names): v
            for labels, v in self.series(name).items()
            if v != 0
        }


def _family(sample: str) -> str:
    for suffix in ("_total", "_created", "_bucket", "_count", "_sum"):
        if sample.endswith(suffix) and sample.removesuffix(suffix) in LABELS:
            return sample.removesuffix(suffix)
    return sample


def parse(text: str) -> Scrape:
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples: dict[Key, float] = {}
    for family in families.values():
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return Scrape(text, families, samples)


async def scrape(proxy: ProxyProcess) -> Scrape:
    return parse(await proxy.metrics_text())


async def wait_metric(
    proxy: ProxyProcess,
    check: Callable[[Scrape], bool],
    *,
    timeout: float = 5.0,
    what: str = "",
) -> Scrape:
    """Scrape until ``check`` holds. Metrics have no event to await, so this polls (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        current = await scrape(proxy)
        if check(current):
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"metric condition not met in {timeout}s: {what}\n{current.text}")
        await asyncio.sleep(0.05)


async def eventually(check: Callable[[], T], *, timeout: float = 5.0, what: str = "") -> T:
    """Poll a cheap in-process condition (e.g. a backend's hit count, the fake API's state),
    bounded; what it returned once true."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout}s: {what}")
        await asyncio.sleep(0.005)
    return result
