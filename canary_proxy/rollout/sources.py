"""Metric sources for the analysis: PromQL over Prometheus' HTTP API, or the proxies' own /metrics.

Both answer ``sample(window) -> Window`` for one route from the proxy's per-version series
``canary_proxy_requests_total{route,version,code,method}`` and
``canary_proxy_request_duration_seconds_bucket{route,version,le}``, so traffic routed by
header or cookie counts for the version that served it, exactly like weighted traffic. Asked
for the mirror too (a plan with ``mirror`` steps), they add the copies' stats from
``canary_proxy_mirror_requests_total{route,code}`` (``error`` and ``timeout`` count as 5xx)
and ``canary_proxy_mirror_request_duration_seconds_bucket{route,le}``.

One proxy serves many routes, each its own stable/canary pair, and a rollout drives one of
them: every series is read for ``route`` only, so another route's errors or latency never
count for (or against) this canary.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from ..router import CANARY, DEFAULT_ROUTE, STABLE, UNROUTED
from .analysis import SourceError, VersionStats, Window, histogram_quantile

MIRROR = "mirror"  # the pseudo-version the mirror's series are filed under
REQUESTS = "canary_proxy_requests_total"
BUCKETS = "canary_proxy_request_duration_seconds_bucket"
MIRROR_REQUESTS = "canary_proxy_mirror_requests_total"
MIRROR_BUCKETS = "canary_proxy_mirror_request_duration_seconds_bucket"
MIRROR_FAILED = ("error", "timeout")  # mirror codes that count as errors, beside 5xx
QUANTILE = 0.99


# -- Prometheus ---------------------------------------------------------------------------------


def promql_string(value: str) -> str:
    """``value`` as a double-quoted PromQL string literal (a route name is any string).

    PromQL unquotes a string as Go does, and every escape JSON writes (before a quote, a
    backslash or a control character) is one of Go's. Non-ASCII stays UTF-8: JSON would
    write a character outside the BMP as a surrogate pair, which Go refuses.
    """
    return json.dumps(value, ensure_ascii=False)


def promql(window: float, *, route: str = DEFAULT_ROUTE) -> dict[str, str]:
    """The three queries of one check of ``route``, over a ``window``-second range."""
    w = f"{max(1, round(window * 1000))}ms"
    r = f"route={promql_string(route)}"
    return {
        "requests": f"sum by (version) (increase({REQUESTS}{{{r}}}[{w}]))",
        "errors": f'sum by (version) (increase({REQUESTS}{{{r}, code=~"5.."}}[{w}]))',
        "p99": f"histogram_quantile({QUANTILE}, sum by (version, le) (rate({BUCKETS}{{{r}}}[{w}])))",
    }


def mirror_promql(window: float, *, route: str = DEFAULT_ROUTE) -> dict[str, str]:
    """The mirror's three queries, labelled ``version="mirror"`` to share the vector parsing."""
    w = f"{max(1, round(window * 1000))}ms"
    r = f"route={promql_string(route)}"
    tag = 'label_replace({q}, "version", "mirror", "", "")'
    failed = "|".join(("5..", *MIRROR_FAILED))
    return {
        "requests": tag.format(q=f"sum(increase({MIRROR_REQUESTS}{{{r}}}[{w}]))"),
        "errors": tag.format(q=f'sum(increase({MIRROR_REQUESTS}{{{r}, code=~"{failed}"}}[{w}]))'),
        "p99": tag.format(
            q=f"histogram_quantile({QUANTILE}, sum by (le) (rate({MIRROR_BUCKETS}{{{r}}}[{w}])))"
        ),
    }


class PrometheusSource:
    """Instant queries against ``URL/api/v1/query``; the window is the PromQL range.

    A series first seen inside the window (e.g. the first 5xx of a version) counts from its
    second scrape, as ``increase()`` always does: detection may lag one scrape interval.
    """

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        *,
        mirror: bool = False,
        route: str = DEFAULT_ROUTE,
    ) -> None:
        self.url = url.rstrip("/") + "/api/v1/query"
        self._session = session
        self._mirror = mirror
        self.route = route

    async def sample(self, window: float) -> Window:
        queries = list(promql(window, route=self.route).values())
        if self._mirror:
            queries += mirror_promql(window, route=self.route).values()
        answers = await asyncio.gather(*(self._query(q) for q in queries))
        # requests, errors, p99 (then the mirror's, under version "mirror"): merge every third.
        requests, errors, p99 = ({k: v for a in answers[i::3] for k, v in a.items()} for i in range(3))
        return Window(
            stable=_stats(requests, errors, p99, STABLE),
            canary=_stats(requests, errors, p99, CANARY),
            mirror=_stats(requests, errors, p99, MIRROR) if self._mirror else None,
        )

    async def _query(self, query: str) -> dict[str, float]:
        """``{version: value}`` of an instant vector query."""
        try:
            async with self._session.get(self.url, params={"query": query}) as response:
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise SourceError(f"prometheus {self.url}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(body, dict) or body.get("status") != "success":
            error = body.get("error") if isinstance(body, dict) else body
            raise SourceError(f"prometheus {self.url}: query failed: {error}; query: {query}")
        return vector_by_version(body.get("data", {}).get("result", []))


def vector_by_version(result: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """An instant vector ``[{"metric": {"version": ..}, "value": [t, "1.5"]}]`` -> by version."""
    out: dict[str, float] = {}
    for item in result:
        version = item.get("metric", {}).get("version")
        value = float(item.get("value", [0, "NaN"])[1])
        if version is not None and math.isfinite(value):
            out[version] = value
    return out


def _stats(
    requests: dict[str, float], errors: dict[str, float], p99: dict[str, float], version: str
) -> VersionStats:
    return VersionStats(requests.get(version, 0.0), errors.get(version, 0.0), p99.get(version))


# -- scraping the proxies -------------------------------------------------------------------------

# One scrape of one route, flattened: (kind, version, code or le) -> value, for kind "requests"
# or "bucket"; the mirror's series are filed under the version MIRROR.
Series = dict[tuple[str, str, str], float]
READ = frozenset({REQUESTS, BUCKETS, MIRROR_REQUESTS, MIRROR_BUCKETS})
SHOWN_ROUTES = 10  # at most this many of the routes a scrape has, named when ours is missing


def parse_scrape(text: str, *, route: str = DEFAULT_ROUTE) -> Series:
    """The request counters and latency buckets of ``route`` on one /metrics page.

    A proxy creates a route's latency buckets at zero as soon as it serves the route, so a
    page without any series of ``route`` means a wrong ``--route`` (or a replica that has not
    loaded the route yet): SourceError, naming the routes the page does have.
    """
    series: Series = defaultdict(float)
    seen: set[str] = set()
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name not in READ:
                    continue
                labels = sample.labels
                name = labels.get("route")  # none on a proxy from before routes
                if name is not None:
                    seen.add(name)
                if name != route:
                    continue
                if sample.name == REQUESTS:
                    series["requests", labels["version"], labels["code"]] += sample.value
                elif sample.name == BUCKETS:
                    series["bucket", labels["version"], labels["le"]] += sample.value
                elif sample.name == MIRROR_REQUESTS:
                    series["requests", MIRROR, labels["code"]] += sample.value
                elif sample.name == MIRROR_BUCKETS:
                    series["bucket", MIRROR, labels["le"]] += sample.value
    except (ValueError, KeyError, IndexError) as exc:
        raise SourceError(f"unparseable metrics: {exc}") from exc
    if route not in seen:
        routes = sorted(seen - {UNROUTED})
        shown = ", ".join(routes[:SHOWN_ROUTES]) + (", ..." if len(routes) > SHOWN_ROUTES else "")
        raise SourceError(f"no series of route {route!r} (routes on this page: {shown or 'none'})")
    return dict(series)


def delta(previous: Series, current: Series) -> Series:
    """Counter increase between two scrapes of one process.

    A counter that went down, or a series that vanished, means the process restarted and
    its counters began again at zero: the whole current scrape is then the increase.
    """
    restarted = any(current.get(key, -1.0) < value for key, value in previous.items())
    if restarted:
        return dict(current)
    return {key: value - previous.get(key, 0.0) for key, value in current.items()}


def window_of(increase: Series) -> Window:
    """Sum the per-code and per-bucket increases into the two versions' stats."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    buckets: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (kind, version, label), value in increase.items():
        if kind == "requests":
            totals[version][0] += value
            if label.startswith("5") or label in MIRROR_FAILED:
                totals[version][1] += value
        else:
            buckets[version].append((float(label), value))

    def stats(version: str) -> VersionStats:
        requests, errors = totals[version]
        return VersionStats(requests, errors, histogram_quantile(QUANTILE, buckets[version]))

    return Window(stable=stats(STABLE), canary=stats(CANARY), mirror=stats(MIRROR))


def add(total: Series, part: Series) -> Series:
    out = dict(total)
    for key, value in part.items():
        out[key] = out.get(key, 0.0) + value
    return out


class ScrapeSource:
    """Scrape each proxy's /metrics; a window is the counter increase since the previous sample,
    summed over every URL (so ``window`` is ignored: the interval between samples is it).

    A URL's first scrape is only a baseline. When any URL fails, the sample fails (the check
    is inconclusive, never judged on part of the fleet) and that URL starts a new baseline.
    """

    def __init__(
        self, urls: Sequence[str], session: aiohttp.ClientSession, *, route: str = DEFAULT_ROUTE
    ) -> None:
        if not urls:
            raise ValueError("at least one metrics URL")
        self.urls = list(urls)
        self._session = session
        self.route = route
        self._last: dict[str, Series] = {}

    async def sample(self, window: float) -> Window:
        scrapes = await asyncio.gather(*(self._scrape(u) for u in self.urls), return_exceptions=True)
        increase: Series = {}
        failures: list[str] = []
        for url, scrape in zip(self.urls, scrapes, strict=True):
            if isinstance(scrape, BaseException):
                if not isinstance(scrape, SourceError):
                    raise scrape
                self._last.pop(url, None)
                failures.append(str(scrape))
                continue
            previous, self._last[url] = self._last.get(url), scrape
            if previous is not None:
                increase = add(increase, delta(previous, scrape))
        if failures:
            raise SourceError("; ".join(failures))
        return window_of(increase)

    async def _scrape(self, url: str) -> Series:
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    raise SourceError(f"{url}: HTTP {response.status}")
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SourceError(f"{url}: {type(exc).__name__}: {exc}") from exc
        try:
            return parse_scrape(text, route=self.route)
        except SourceError as exc:
            raise SourceError(f"{url}: {exc}") from None
