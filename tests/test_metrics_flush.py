"""The data path counts in plain numbers (metrics.RouteSeries) and a collect hands them to
prometheus_client's children: what a scrape shows must be exactly what counting through the
children would have shown, from whatever thread the collect runs in."""

from __future__ import annotations

import random
import sys
import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from canary_proxy.metrics import DURATION_BUCKETS, NGINX_BUCKETS, Metrics
from canary_proxy.routes import Origin

ORIGIN = Origin("shop", "web", "web", "shop.example", "/", canary="shop-web-canary-80")


def family_lines(page: bytes, name: str) -> list[str]:
    """A family's sample lines, without ``_created`` (a time, different in each registry)."""
    lines = page.decode().splitlines()
    return sorted(line for line in lines if line.startswith(name) and "_created" not in line)


def test_a_flush_shows_what_observe_would_have() -> None:
    """Random durations, on and between bucket bounds and past the last, with random codes
    and methods, counted through RouteSeries and, for reference, straight into children of
    the same families: the two pages are the same, line for line. This also guards the two
    prometheus_client attributes a flush writes to (Histogram._buckets and _sum)."""
    rng = random.Random(7)
    registry = CollectorRegistry()
    metrics = Metrics(registry, nginx=True)
    reference = CollectorRegistry()
    requests = Counter("requests", "", ["route", "version", "code", "method"], namespace="canary_proxy",
                       registry=reference)  # fmt: skip
    duration = Histogram("request_duration_seconds", "", ["route", "version"], namespace="canary_proxy",
                         buckets=DURATION_BUCKETS, registry=reference)  # fmt: skip
    nginx = Histogram("response_duration_seconds", "", ["status", "method", "path", "namespace", "ingress",
                      "service", "canary", "host"], namespace="nginx_ingress_controller",
                      buckets=NGINX_BUCKETS, registry=reference)  # fmt: skip
    series = metrics.series("shop/web", ORIGIN)
    bounds = [*DURATION_BUCKETS, *NGINX_BUCKETS]
    for n in range(5000):
        version = rng.choice(["stable", "canary"])
        code, method = rng.choice([200, 404, 503]), rng.choice(["GET", "POST", "BREW"])
        seconds = rng.choice(bounds) if n % 3 == 0 else rng.uniform(0, 12)
        series.request(version, code, method, seconds)
        label = "OTHER" if method == "BREW" else method
        requests.labels("shop/web", version, str(code), label).inc()
        duration.labels("shop/web", version).observe(seconds)
        canary = ORIGIN.canary if version == "canary" else ""
        nginx.labels(str(code), label, "/", "shop", "web", "web", canary, "shop.example").observe(seconds)
        if n % 1000 == 999:  # flushed several times over: each flush adds only what is new
            generate_latest(registry)

    ours, theirs = generate_latest(registry), generate_latest(reference)
    for name in ("canary_proxy_requests_total", "canary_proxy_request_duration_seconds_bucket",
                 "canary_proxy_request_duration_seconds_count",
                 "nginx_ingress_controller_response_duration_seconds_bucket",
                 "nginx_ingress_controller_response_duration_seconds_count"):  # fmt: skip
        assert family_lines(ours, name) == family_lines(theirs, name), name
        assert family_lines(ours, name), name
    for name in (
        "canary_proxy_request_duration_seconds_sum",
        "nginx_ingress_controller_response_duration_seconds_sum",
    ):
        for mine, reference_line in zip(family_lines(ours, name), family_lines(theirs, name), strict=True):
            labels, _, value = mine.rpartition(" ")
            reference_labels, _, reference_value = reference_line.rpartition(" ")
            assert labels == reference_labels
            # Summed in another order (per flush), so equal to rounding: 1e-9 of ~30,000 s.
            assert abs(float(value) - float(reference_value)) < 1e-9 * float(reference_value)


def test_a_collect_in_another_thread_loses_no_count() -> None:
    """/metrics and /stats collect in a thread while the event loop counts: every count and
    the in-flight level still arrive exactly, however the two interleave."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    series = metrics.series("default")
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            generate_latest(registry)

    scrapers = [threading.Thread(target=scrape) for _ in range(2)]  # two flushes may overlap too
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns every few bytecodes, not every 5 ms
    for thread in scrapers:
        thread.start()
    try:
        for n in range(200_000):
            series.enter("canary")
            series.request("canary", 200, "GET", 0.001 * (n % 7))
            series.decision("canary", "weight")
            if n % 2:
                series.leave("canary", "sticky", 200, "POST", 0.5)
    finally:
        stop.set()
        for thread in scrapers:
            thread.join()
        sys.setswitchinterval(interval)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"route": "default", "version": "canary", **labels})

    assert value("canary_proxy_requests_total", code="200", method="GET") == 200_000
    assert value("canary_proxy_requests_total", code="200", method="POST") == 100_000
    assert value("canary_proxy_request_duration_seconds_count") == 300_000
    fast = sum(1 for n in range(200_000) if 0.001 * (n % 7) <= 0.005)
    assert value("canary_proxy_request_duration_seconds_bucket", le="0.005") == fast
    assert value("canary_proxy_request_duration_seconds_bucket", le="0.5") == 300_000
    assert value("canary_proxy_routing_decisions_total", rule="weight") == 200_000
    assert value("canary_proxy_routing_decisions_total", rule="sticky") == 100_000
    assert value("canary_proxy_in_flight_requests") == 100_000
