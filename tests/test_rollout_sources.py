"""Metric sources: scrape parsing, counter deltas and resets (pure), and both sources over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from canary_proxy.metrics import Metrics
from canary_proxy.rollout.analysis import SourceError
from canary_proxy.rollout.sources import (
    PrometheusSource,
    ScrapeSource,
    delta,
    parse_scrape,
    promql,
    vector_by_version,
    window_of,
)


def exposition(requests: dict[tuple[str, int], int], latency: dict[str, list[float]]) -> str:
    """A real /metrics page from the proxy's own collectors."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.init_data_plane()
    for (version, code), count in requests.items():
        for _ in range(count):
            metrics.requests.labels("default", version, str(code), "GET").inc()
    for version, seconds in latency.items():
        for value in seconds:
            metrics.duration.labels("default", version).observe(value)
    return generate_latest(registry).decode()


def test_parse_and_window() -> None:
    text = exposition(
        {("canary", 200): 90, ("canary", 503): 10, ("stable", 200): 400, ("stable", 404): 5},
        {"canary": [0.04] * 99 + [2.0], "stable": [0.004] * 405},
    )
    window = window_of(parse_scrape(text))
    assert (window.canary.requests, window.canary.errors) == (100, 10)
    assert (window.stable.requests, window.stable.errors) == (405, 0)  # a 404 is not an error
    assert window.canary.p99 == pytest.approx(0.05)  # rank 99 of 100: the top of (25, 50] ms
    assert window.stable.p99 == pytest.approx(0.00495)


def test_the_mirror_copies_are_a_window_of_their_own() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.init_data_plane()
    for code, count, seconds in (
        ("200", 90, 0.02),
        ("503", 4, 0.02),
        ("timeout", 3, 2.0),
        ("error", 3, 0.001),
    ):
        for _ in range(count):
            metrics.count_mirror("default", code, seconds)
    for _ in range(50):
        metrics.count_request("default", "stable", 200, "GET", 0.004)
    window = window_of(parse_scrape(generate_latest(registry).decode()))
    assert window.mirror is not None
    assert (window.mirror.requests, window.mirror.errors) == (100, 10)  # 5xx, timeout and error
    assert window.mirror.p99 == pytest.approx(2.0)  # rank 99: 2 of the 3 in (1, 2.5] s, interpolated
    assert window.canary.requests == 0  # copies never count as the canary's own requests
    judged = window.mirrored()
    assert (judged.canary, judged.stable) == (window.mirror, window.stable)


def test_delta_between_scrapes() -> None:
    before = parse_scrape(exposition({("canary", 200): 10}, {"canary": [0.01] * 10}))
    after = parse_scrape(exposition({("canary", 200): 15, ("canary", 500): 5}, {"canary": [0.01] * 20}))
    window = window_of(delta(before, after))
    assert (window.canary.requests, window.canary.errors) == (10, 5)


def test_a_counter_that_went_down_means_a_restart() -> None:
    before = parse_scrape(exposition({("canary", 200): 1000}, {"canary": [0.01] * 1000}))
    after = parse_scrape(exposition({("canary", 200): 30, ("canary", 500): 3}, {"canary": [0.01] * 33}))
    window = window_of(delta(before, after))
    assert (window.canary.requests, window.canary.errors) == (33, 3)  # the new values are the delta


def test_prometheus_vectors() -> None:
    result = [
        {"metric": {"version": "canary"}, "value": [1, "12.5"]},
        {"metric": {"version": "stable"}, "value": [1, "NaN"]},
        {"metric": {}, "value": [1, "3"]},
    ]
    assert vector_by_version(result) == {"canary": 12.5}
    queries = promql(30)
    assert (
        queries["errors"] == 'sum by (version) (increase(canary_proxy_requests_total{code=~"5.."}[30000ms]))'
    )
    assert queries["p99"].startswith("histogram_quantile(0.99, sum by (version, le) (rate(")


@pytest.fixture
async def pages() -> AsyncIterator[tuple[list[str | int], str]]:
    """A /metrics endpoint that serves the next scripted page (or status code) per request."""
    script: list[str | int] = []

    async def metrics(request: web.Request) -> web.Response:
        item = script.pop(0)
        if isinstance(item, int):
            return web.Response(status=item)
        return web.Response(text=item)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield script, f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
    await runner.cleanup()


async def test_scrape_source_baseline_restart_and_failure(pages: tuple[list[str | int], str]) -> None:
    script, url = pages
    script += [
        exposition({("canary", 200): 100}, {"canary": [0.01] * 100}),
        exposition({("canary", 200): 150}, {"canary": [0.01] * 150}),
        exposition({("canary", 200): 7}, {"canary": [0.01] * 7}),  # restarted
        500,
        exposition({("canary", 200): 20}, {"canary": [0.01] * 20}),
        exposition({("canary", 200): 25}, {"canary": [0.01] * 25}),
    ]
    async with aiohttp.ClientSession() as session:
        source = ScrapeSource([url], session)
        assert (await source.sample(1)).canary.requests == 0  # the first scrape is a baseline
        assert (await source.sample(1)).canary.requests == 50
        assert (await source.sample(1)).canary.requests == 7
        with pytest.raises(SourceError, match="HTTP 500"):
            await source.sample(1)
        assert (await source.sample(1)).canary.requests == 0  # a new baseline after a failure
        assert (await source.sample(1)).canary.requests == 5


async def test_prometheus_source_reports_query_errors(pages: tuple[list[str | int], str]) -> None:
    _, url = pages
    async with aiohttp.ClientSession() as session:
        source = PrometheusSource(url.removesuffix("/metrics") + "/nowhere", session)
        with pytest.raises(SourceError):
            await source.sample(60)
