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
    mirror_promql,
    parse_scrape,
    promql,
    promql_string,
    vector_by_version,
    window_of,
)

# Another route's canary: failing, slow, and its mirrored copies failing too. Read for any
# other route, none of it may show.
BROKEN = "shop/checkout"


def exposition(
    requests: dict[tuple[str, int], int],
    latency: dict[str, list[float]],
    *,
    route: str = "default",
    other: str | None = None,
) -> str:
    """A real /metrics page from the proxy's own collectors: ``route``'s series as given; with
    ``other``, that route's canary fails every request and copy, slowly."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.init_data_plane(route)
    for (version, code), count in requests.items():
        for _ in range(count):
            metrics.requests.labels(route, version, str(code), "GET").inc()
    for version, seconds in latency.items():
        for value in seconds:
            metrics.duration.labels(route, version).observe(value)
    if other is not None:
        break_route(metrics, other, 1000)
    return generate_latest(registry).decode()


def break_route(metrics: Metrics, route: str, count: int) -> None:
    """``count`` failed, slow requests on ``route``'s canary and as many failed copies."""
    metrics.init_data_plane(route)
    for _ in range(count):
        metrics.count_request(route, "canary", 503, "GET", 5.0)
        metrics.count_mirror(route, "timeout", 5.0)
    metrics.count_rejected(404, "GET")  # route="none", version="none": no route's either


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
    assert queries["errors"] == (
        'sum by (version) (increase(canary_proxy_requests_total{route="default", code=~"5.."}[30000ms]))'
    )
    assert queries["p99"].startswith("histogram_quantile(0.99, sum by (version, le) (rate(")


def test_every_query_reads_one_route_only() -> None:
    queries = [*promql(60, route=BROKEN).values(), *mirror_promql(60, route=BROKEN).values()]
    for query in queries:
        assert query.count("{") == 1 and '{route="shop/checkout"' in query, query
    assert mirror_promql(60)["errors"] == (
        'label_replace(sum(increase(canary_proxy_mirror_requests_total{route="default", '
        'code=~"5..|error|timeout"}[60000ms])), "version", "mirror", "", "")'
    )


@pytest.mark.parametrize(
    ("name", "literal"),
    [
        ("default", '"default"'),
        ("shop/checkout", '"shop/checkout"'),
        ('say "hi"', r'"say \"hi\""'),
        ("C:\\routes", r'"C:\\routes"'),
        ("two\nlines", r'"two\nlines"'),
        ("café 🚀", '"café 🚀"'),  # UTF-8 as is: Go refuses JSON's surrogate pairs
    ],
)
def test_a_route_name_is_a_quoted_promql_string(name: str, literal: str) -> None:
    assert promql_string(name) == literal
    assert f"route={literal}" in promql(60, route=name)["requests"]


def test_the_scrape_reads_its_route_only() -> None:
    """Two routes on one page: the other's failing canary and copies do not leak in."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.init_data_plane()
    for _ in range(100):
        metrics.count_request("default", "canary", 200, "GET", 0.02)
        metrics.count_request("default", "stable", 200, "GET", 0.02)
        metrics.count_mirror("default", "200", 0.02)
    break_route(metrics, BROKEN, 50)
    text = generate_latest(registry).decode()

    ours = window_of(parse_scrape(text))
    for stats in (ours.canary, ours.stable, ours.mirror):
        assert stats is not None and (stats.requests, stats.errors) == (100, 0)
        assert stats.p99 == pytest.approx(0.02485)  # rank 99 of 100 in (10, 25] ms: none at 5 s
    theirs = window_of(parse_scrape(text, route=BROKEN))
    assert (theirs.canary.requests, theirs.canary.errors, theirs.stable.requests) == (50, 50, 0)
    assert theirs.mirror is not None and (theirs.mirror.requests, theirs.mirror.errors) == (50, 50)


def test_a_route_the_page_does_not_have_is_named_with_those_it_has() -> None:
    text = exposition({("canary", 200): 10}, {}, route="shop/cart", other=BROKEN)
    expected = r"no series of route 'shop/car' \(routes on this page: shop/cart, shop/checkout\)"
    with pytest.raises(SourceError, match=expected):
        parse_scrape(text, route="shop/car")


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


async def test_scrape_source_reads_its_route_only(pages: tuple[list[str | int], str]) -> None:
    script, url = pages
    script += [
        exposition({("canary", 200): 100}, {"canary": [0.01] * 100}, route="shop/cart", other=BROKEN),
        exposition({("canary", 200): 150}, {"canary": [0.01] * 150}, route="shop/cart", other=BROKEN),
        exposition({("canary", 200): 150}, {"canary": [0.01] * 150}, route="shop/carts"),
    ]
    async with aiohttp.ClientSession() as session:
        source = ScrapeSource([url], session, route="shop/cart")
        await source.sample(1)  # the baseline
        window = await source.sample(1)
        assert (window.canary.requests, window.canary.errors) == (50, 0)
        assert window.canary.p99 == pytest.approx(0.00995)  # in (5, 10] ms: none of theirs at 5 s
        with pytest.raises(SourceError, match=f"{url}: no series of route 'shop/cart'"):
            await source.sample(1)  # a page without our route: inconclusive, never zero traffic


async def test_prometheus_source_reports_query_errors(pages: tuple[list[str | int], str]) -> None:
    _, url = pages
    async with aiohttp.ClientSession() as session:
        source = PrometheusSource(url.removesuffix("/metrics") + "/nowhere", session)
        with pytest.raises(SourceError):
            await source.sample(60)
