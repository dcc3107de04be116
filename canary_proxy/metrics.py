"""Every Prometheus collector canary-proxy exports, built in one place on a registry passed in.

Label values come only from fixed sets (versions, rules, reasons, a method allow-list and
HTTP status codes) and from the config (route names; in Ingress mode, the Ingress's names,
hosts and paths), so no client input can create a new series. Every per-version series
carries the ``route`` it served (``default`` for a lone catch-all route, ``none`` for a
request no route matched): the number of series grows with the number of routes and nothing
else (docs/metrics.md gives the count per route).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .router import CANARY, DEFAULT_ROUTE, UNROUTED, VERSIONS
from .routes import Origin

NAMESPACE: Final = "canary_proxy"

# Prometheus' classic latency buckets (5 ms .. 10 s) plus 0.15, 0.2, 0.3 and 0.4 s, where
# web latencies and the p99 limits a rollout compares live. A quantile is interpolated
# within its bucket, so it is only as precise as that bucket is narrow: with the classic
# set alone, everything from 100 to 250 ms read as one value. 18 buckets still keep each
# observation and scrape cheap.
DURATION_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0,
)  # fmt: skip

KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)
MIRROR_SKIP_REASONS: Final = ("body-too-large", "in-flight-limit")


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "OTHER"


class Metrics:
    """The collectors, with the label sets that must exist from the first scrape at zero.

    In multi-worker mode prometheus_client runs in multiprocess mode: each gauge states how
    the workers' values combine, always without a ``pid`` label.
    """

    def __init__(self, registry: CollectorRegistry, *, nginx: bool = False) -> None:
        # Ingress mode's ingress-nginx-compatible families (``serve --nginx-metrics``), for
        # the routes that come from an Ingress; None: not exported at all.
        self.nginx = NginxMetrics(registry) if nginx else None
        self.requests = Counter(
            "requests",
            "Requests answered, by the version that served (or was tried), status and method.",
            ["route", "version", "code", "method"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.duration = Histogram(
            "request_duration_seconds",
            "Time from request received to last response byte sent.",
            ["route", "version"],
            namespace=NAMESPACE,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "upstream_errors",
            "Upstream failures by version and reason (connect, timeout, reset, protocol).",
            ["route", "version", "reason"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.decisions = Counter(
            "routing_decisions",
            "Routing decisions by the version chosen and the rule that chose it.",
            ["route", "version", "rule"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.in_flight = Gauge(
            "in_flight_requests",
            "Requests being proxied now.",
            ["route", "version"],
            namespace=NAMESPACE,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.websockets = Gauge(
            "websocket_connections",
            "WebSocket connections open now.",
            ["route", "version"],
            namespace=NAMESPACE,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.weight_ratio = Gauge(
            "canary_weight_ratio",
            "The canary's configured share of weighted traffic, 0..1.",
            ["route"],
            namespace=NAMESPACE,
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.config_reloads = Counter(
            "config_reloads",
            "Config loads by result; the initial load counts as one success.",
            ["result"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.config_last_success = Gauge(
            "config_last_success_timestamp_seconds",
            "Unix time of the last config load that succeeded.",
            namespace=NAMESPACE,
            registry=registry,
            multiprocess_mode="max",
        )
        self.outlier_ejections = Counter(
            "outlier_ejections",
            "Times the canary was ejected from its weighted share after canary-outlier-failures "
            "connect failures within 10 s.",
            ["route"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.worker_restarts = Counter(
            "worker_restarts",
            "Worker processes that died and were restarted by the supervisor.",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.mirror_requests = Counter(
            "mirror_requests",
            "Mirror copies sent to the canary, by the canary's status, or error or timeout. "
            "Not in requests_total: the client never sees them.",
            ["route", "code"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.mirror_duration = Histogram(
            "mirror_request_duration_seconds",
            "Time from sending a mirror copy to the canary's last response byte (or its failure).",
            ["route"],
            namespace=NAMESPACE,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.mirror_skipped = Counter(
            "mirror_skipped",
            "Requests picked for mirroring but not copied: body-too-large or in-flight-limit.",
            ["reason"],
            namespace=NAMESPACE,
            registry=registry,
        )
        # labels() takes a lock and builds a tuple each call: the per-request path finds a
        # route's children once (RouteSeries), keyed by label values (no client input).
        self._series: dict[str, RouteSeries] = {}

    def init_data_plane(self, route: str | None = DEFAULT_ROUTE) -> None:
        """Create a route's per-version series at zero so rate() works from the first scrape
        (None: only the series of no route; the proxy adds each route's as it loads it)."""
        for reason in MIRROR_SKIP_REASONS:
            self.mirror_skipped.labels(reason)
        if route is None:
            return
        for version in VERSIONS:
            self.duration.labels(route, version)
            self.in_flight.labels(route, version)
            self.websockets.labels(route, version)
            self.decisions.labels(route, version, "weight")
        self.outlier_ejections.labels(route)
        self.mirror_duration.labels(route)

    def init_control_plane(self) -> None:
        for result in ("success", "failure"):
            self.config_reloads.labels(result)

    def series(self, route: str, origin: Origin | None = None) -> RouteSeries:
        """One route's per-request children, built once per route name; a route read from an
        Ingress (``origin``) also counts in the ingress-nginx families when they are on."""
        if origin is not None and self.nginx is not None:
            return self.nginx.series(self, route, origin)
        found = self._series.get(route)
        if found is None:
            found = self._series[route] = RouteSeries(self, route)
        return found

    def count_request(self, route: str, version: str, code: int, method: str, seconds: float) -> None:
        self.series(route).request(version, code, method, seconds)

    def count_decision(self, route: str, version: str, rule: str) -> None:
        self.series(route).decision(version, rule)

    def count_rejected(self, code: int, method: str) -> None:
        """A request answered before a route took it (malformed, too large, no route):
        ``route="none", version="none"``."""
        self.requests.labels(UNROUTED, UNROUTED, str(code), method_label(method)).inc()

    def count_mirror(self, route: str, code: str, seconds: float) -> None:
        self.mirror_requests.labels(route, code).inc()
        self.mirror_duration.labels(route).observe(seconds)


class RouteSeries:
    """One route's series for the per-request path, found without building label tuples:
    in flight and duration by version, requests by (version, code, method label), decisions
    by (version, rule). The caches are keyed by label values, so client input cannot grow
    them."""

    __slots__ = ("_decisions", "_metrics", "_requests", "duration", "in_flight", "route")

    def __init__(self, metrics: Metrics, route: str) -> None:
        self._metrics = metrics
        self.route = route
        self.in_flight = {v: metrics.in_flight.labels(route, v) for v in VERSIONS}
        self.duration = {v: metrics.duration.labels(route, v) for v in VERSIONS}
        self._requests: dict[tuple[str, int, str], Counter] = {}
        self._decisions: dict[tuple[str, str], Counter] = {}

    def request(self, version: str, code: int, method: str, seconds: float) -> None:
        key = (version, code, method if method in KNOWN_METHODS else "OTHER")
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self._metrics.requests.labels(
                self.route, version, str(code), key[2]
            )
        child.inc()
        self.duration[version].observe(seconds)

    def decision(self, version: str, rule: str, count: int = 1) -> None:
        """``count`` decisions (the proxy sums a batch's: see proxy/tally.py)."""
        decided = self._decisions.get((version, rule))
        if decided is None:
            decided = self._decisions[(version, rule)] = self._metrics.decisions.labels(
                self.route, version, rule
            )
        decided.inc(count)


# -- ingress-nginx-compatible metrics (Ingress mode) -----------------------------------------

NGINX_NAMESPACE: Final = "nginx_ingress_controller"
NGINX_DURATION: Final = f"{NGINX_NAMESPACE}_response_duration_seconds"
NGINX_REQUESTS: Final = f"{NGINX_NAMESPACE}_requests"
NGINX_LATENCY: Final = f"{NGINX_NAMESPACE}_ingress_upstream_latency_seconds"
# ingress-nginx's per-request labels (its socket collector's, with ``host`` as its default
# --metrics-per-host adds), in its order; the summary has only the four of the upstream.
NGINX_LABELS: Final = ("status", "method", "path", "namespace", "ingress", "service", "canary", "host")
NGINX_LATENCY_LABELS: Final = ("ingress", "namespace", "service", "canary")
# ingress-nginx's --time-buckets default: client_golang's DefBuckets.
NGINX_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class NginxMetrics:
    """ingress-nginx's request families, labelled from a route's Ingress origin, so that
    Flagger's built-in nginx checks and dashboards written for ingress-nginx read canary-proxy
    unchanged. docs/metrics.md says where each value comes from and where it differs.

    A request is observed once, in the response-duration histogram: ingress-nginx's request
    counter is that histogram's count, and its upstream-latency summary the histogram's sums
    and counts regrouped by its four labels, so ``exposition`` writes both from it at scrape
    time instead of making three observations per request."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.response_duration = Histogram(
            "response_duration_seconds",
            "Time from request received to last response byte sent, on routes read from an "
            "Ingress (ingress-nginx's upstream response time histogram).",
            NGINX_LABELS,
            namespace=NGINX_NAMESPACE,
            buckets=NGINX_BUCKETS,
            registry=registry,
        )
        self._series: dict[str, NginxRouteSeries] = {}

    def series(self, metrics: Metrics, route: str, origin: Origin) -> NginxRouteSeries:
        """The route's children, rebuilt only when its labels change (a canary Ingress came
        or went, a backend Service changed): not on every weight patch."""
        found = self._series.get(route)
        if found is None or found.origin_labels != _origin_labels(origin):
            found = self._series[route] = NginxRouteSeries(metrics, route, self, origin)
        return found


def _origin_labels(origin: Origin) -> tuple[str, ...]:
    return (origin.namespace, origin.ingress, origin.service, origin.host, origin.path, origin.canary)


class NginxRouteSeries(RouteSeries):
    """A route read from an Ingress: its canary-proxy series, and its ingress-nginx ones.

    As ingress-nginx labels a request: ``ingress``, ``service``, ``host`` and ``path`` are the
    main Ingress's rule (a canary request too: ingress-nginx serves it from the main
    Ingress's location), and ``canary`` is "" for stable and the canary upstream's
    ``NAMESPACE-SERVICE-PORT`` for the canary. ``status`` is the status sent to the client.
    """

    __slots__ = ("_canary", "_nginx", "_nginx_children", "origin_labels")

    def __init__(self, metrics: Metrics, route: str, nginx: NginxMetrics, origin: Origin) -> None:
        super().__init__(metrics, route)
        self._nginx = nginx
        self.origin_labels = _origin_labels(origin)
        # ingress-nginx's ``canary``: the alternative upstream's name, "" for the main one.
        self._canary = {version: origin.canary if version == CANARY else "" for version in VERSIONS}
        # None at zero: ingress-nginx has no series before a request (Flagger: "no values").
        self._nginx_children: dict[tuple[str, int, str], Histogram] = {}

    def request(self, version: str, code: int, method: str, seconds: float) -> None:
        RouteSeries.request(self, version, code, method, seconds)
        key = (version, code, method if method in KNOWN_METHODS else "OTHER")
        child = self._nginx_children.get(key)
        if child is None:
            namespace, ingress, service, host, path, _ = self.origin_labels
            values = (str(code), key[2], path, namespace, ingress, service, self._canary[version], host)
            child = self._nginx_children[key] = self._nginx.response_duration.labels(*values)
        child.observe(seconds)


def exposition(registry: Collector) -> bytes:
    """The /metrics page: prometheus_client's text format, plus ingress-nginx's request
    counter and upstream-latency summary, derived from the response-duration histogram
    (see NginxMetrics). One collect() serves both: with several workers it reads every
    worker's files."""
    collected = list(registry.collect())
    page = generate_latest(_Collected(collected))
    for metric in collected:
        if metric.name == NGINX_DURATION and metric.samples:
            page += _nginx_derived(metric)
    return page


def _nginx_derived(histogram: Metric) -> bytes:
    requests = Metric(NGINX_REQUESTS, "Requests answered on routes read from an Ingress.", "counter")
    latency = Metric(
        NGINX_LATENCY,
        "DEPRECATED, for Flagger before 1.38: the duration of response_duration_seconds, "
        "as a summary (sum and count, no quantiles).",
        "summary",
    )
    totals: dict[tuple[str, ...], list[float]] = {}
    for sample in histogram.samples:
        part = sample.name.removeprefix(NGINX_DURATION)
        if part not in ("_count", "_sum"):
            continue
        if part == "_count":  # the bare name client_golang gives a counter: see below
            requests.add_sample(NGINX_REQUESTS, sample.labels, sample.value)
        key = tuple(sample.labels[name] for name in NGINX_LATENCY_LABELS)
        totals.setdefault(key, [0.0, 0.0])[part == "_count"] += sample.value
    for key, (seconds, count) in totals.items():
        labels = dict(zip(NGINX_LATENCY_LABELS, key, strict=True))
        latency.add_sample(NGINX_LATENCY + "_sum", labels, seconds)
        latency.add_sample(NGINX_LATENCY + "_count", labels, count)
    # Flagger's query names the counter ``nginx_ingress_controller_requests``, as ingress-nginx
    # exports it; generate_latest names a counter family NAME_total in its HELP and TYPE
    # lines (the first two), so they are renamed to match the samples.
    counter = generate_latest(_Collected([requests]))
    counter = counter.replace(f"{NGINX_REQUESTS}_total ".encode(), f"{NGINX_REQUESTS} ".encode(), 2)
    return counter + generate_latest(_Collected([latency]))


class _Collected:
    """Metrics already collected, as a Collector for generate_latest."""

    def __init__(self, metrics: Iterable[Metric]) -> None:
        self._metrics = list(metrics)

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)
