"""Every Prometheus collector canary-proxy exports, built in one place on a registry passed in.

Label values come only from fixed sets (versions, rules, reasons, a method allow-list and
HTTP status codes) and from the config (route names; in Ingress mode, the Ingress's names,
hosts and paths), so no client input can create a new series. Every per-version series
carries the ``route`` it served (``default`` for a lone catch-all route, ``none`` for a
request no route matched): the number of series grows with the number of routes and nothing
else (docs/metrics.md gives the count per route).
"""

from __future__ import annotations

import threading
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
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
        registry.register(_FlushFirst(self))  # first: a collect flushes, then reads the families
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
        self.tls_secret_problems = Gauge(
            "tls_secret_problem",
            "1 while a TLS Secret an Ingress names gives no usable certificate, by reason "
            "(missing-key, bad-base64, invalid, key-mismatch, not-found, deleted); its hosts "
            "keep their last good certificate, or get the default one. 0 once it is fixed.",
            ["secret", "reason"],
            namespace=NAMESPACE,
            registry=registry,
            multiprocess_mode="mostrecent",
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
        # One route's per-request values, built once per route name and kept: see RouteSeries.
        self._series: dict[str, RouteSeries] = {}
        # Each request and decision label set's slot in every route's array, the same in all.
        self.slots: dict[tuple[str, int, str] | tuple[str, str], int] = {}
        self._slot_labels: list[tuple[str, int, str] | tuple[str, str]] = []
        # With --workers, values go to files the supervisor reads: each worker flushes the
        # series its batch touched at the batch's end (ProxyServer), not at collect time.
        self.shared: bool = getattr(values.ValueClass, "_multiprocess", False)
        self._flushing = threading.Lock()  # one flush at a time: /metrics and /stats may overlap

    def init_data_plane(self, route: str | None = DEFAULT_ROUTE) -> None:
        """Create a route's per-version series at zero so rate() works from the first scrape
        (None: only the series of no route; the proxy adds each route's as it loads it)."""
        for reason in MIRROR_SKIP_REASONS:
            self.mirror_skipped.labels(reason)
        if route is None:
            return
        self._route_series(route)  # its in-flight and duration children, by version
        for version in VERSIONS:
            self.websockets.labels(route, version)
            self.decisions.labels(route, version, "weight")
        self.outlier_ejections.labels(route)
        self.mirror_duration.labels(route)

    def init_control_plane(self) -> None:
        for result in ("success", "failure"):
            self.config_reloads.labels(result)

    def series(self, route: str, origin: Origin | None = None) -> RouteSeries:
        """One route's per-request values, built once per route name; a route read from an
        Ingress (``origin``) also counts in the ingress-nginx families when they are on."""
        found = self._route_series(route)
        nginx = self.nginx
        if nginx is None or origin is None:
            found.nginx = None
        elif found.nginx is None or found.nginx.origin_labels != _origin_labels(origin):
            found.nginx = NginxRouteSeries(nginx, origin)
        return found

    def _route_series(self, route: str) -> RouteSeries:
        found = self._series.get(route)
        if found is None:
            found = self._series[route] = RouteSeries(self, route)
        return found

    def slot(self, labels: tuple[str, int, str] | tuple[str, str]) -> int:
        """The array slot of a request's (version, code, method label) or a decision's
        (version, rule), for every route."""
        found = self.slots.get(labels)
        if found is None:
            found = self.slots[labels] = _FIXED + len(self._slot_labels)
            self._slot_labels.append(labels)
        return found

    def child(self, route: str, slot: int) -> Counter:
        """The counter child that a route's slot (past the fixed ones) is flushed to."""
        labels = self._slot_labels[slot - _FIXED]
        if len(labels) == 3:
            version, code, method = labels
            return self.requests.labels(route, version, str(code), method)
        version, rule = labels
        return self.decisions.labels(route, version, rule)

    def flush(self, series: Iterable[RouteSeries] | None = None) -> None:
        """Hand what the data path counted to the prometheus_client children: every route's
        (the registry's collect does, first), or only ``series`` (a worker, at the end of a
        batch). Safe from any thread: the data path only ever adds to the values it keeps,
        and each flush sends the difference since the last."""
        with self._flushing:
            if series is not None:
                for one in series:
                    one.flush()
                return
            for one in list(self._series.values()):  # one C call: the loop may add a route
                one.flush(nginx=False)
            if self.nginx is not None:
                self.nginx.flush()  # every label set's, those of an Ingress's old labels too

    def count_request(self, route: str, version: str, code: int, method: str, seconds: float) -> None:
        self._route_series(route).request(version, code, method, seconds)

    def count_decision(self, route: str, version: str, rule: str) -> None:
        self._route_series(route).decision(version, rule)

    def count_rejected(self, code: int, method: str) -> None:
        """A request answered before a route took it (malformed, too large, no route):
        ``route="none", version="none"``."""
        self.requests.labels(UNROUTED, UNROUTED, str(code), method_label(method)).inc()

    def count_mirror(self, route: str, code: str, seconds: float) -> None:
        self.mirror_requests.labels(route, code).inc()
        self.mirror_duration.labels(route).observe(seconds)


class _FlushFirst:
    """Registered before every family, so that any collect of the registry (a scrape, /stats,
    ``get_sample_value``) first has the data path's values handed to the children."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # no names of its own; and registering it must not flush

    def collect(self) -> Iterator[Metric]:
        self._metrics.flush()
        return iter(())


class _Observed:
    """One histogram child's observations as the data path keeps them, in one list: a count
    per bucket (each bucket's own, not cumulative), the +Inf bucket's, and last the sum."""

    __slots__ = ("child", "counts", "flushed")

    def __init__(self, child: Histogram, buckets: int) -> None:
        self.child = child
        self.counts: list[float] = [0] * (buckets + 1) + [0.0]
        self.flushed = self.counts.copy()

    def flush(self) -> None:
        now = self.counts.copy()  # one C call: a consistent copy from whatever thread
        flushed = self.flushed
        if now == flushed:
            return
        # prometheus_client has no public call that adds n observations to one bucket;
        # test_metrics_flush.py checks these two attributes against Histogram.observe.
        buckets = self.child._buckets
        for i in range(len(now) - 1):
            if now[i] != flushed[i]:
                buckets[i].inc(now[i] - flushed[i])
        self.child._sum.inc(now[-1] - flushed[-1])
        self.flushed = now


# Where a route's values sit in its array (RouteSeries.values): in flight and the duration's
# sum by version, each version's duration buckets (+Inf last), then the request and decision
# counts, each at the slot Metrics gave its labels when first counted.
_VERSION: Final = {version: index for index, version in enumerate(VERSIONS)}
_SUM: Final = len(VERSIONS)
_BUCKETS: Final = len(DURATION_BUCKETS) + 1
_FIRST_BUCKET: Final = tuple(2 * len(VERSIONS) + i * _BUCKETS for i in range(len(VERSIONS)))
_FIXED: Final = 2 * len(VERSIONS) + len(VERSIONS) * _BUCKETS


class RouteSeries:
    """One route's per-request values, in one ``array('d')``: in flight and duration by
    version, requests by (version, code, method label), decisions by (version, rule); and its
    ingress-nginx histogram (``nginx``), for a route read from an Ingress.

    The data path only adds to numbers in the array, and ``flush`` hands what changed to the
    prometheus_client children. With traffic spread over 1,000 routes every request's route
    is cold in the cache: each object it touches is a miss of its own. The children (a lock
    and an object per value) were ~11 us of a 42 us request; dicts of counters still ~2.5 us.
    One array is two objects, its values side by side. The slots are keyed by label values,
    so client input cannot add any."""

    __slots__ = (
        "_children",
        "_duration",
        "_flushed",
        "_in_flight",
        "_metrics",
        "_slots",
        "nginx",
        "route",
        "values",
    )

    def __init__(self, metrics: Metrics, route: str) -> None:
        self._metrics = metrics
        self._slots = metrics.slots  # shared by every route: hot in the cache
        self.route = route
        self.values = array("d", bytes(8 * _FIXED))
        self._flushed = self.values.tolist()
        # Made now, so they are scraped at zero before the first request.
        self._in_flight = [metrics.in_flight.labels(route, v) for v in VERSIONS]
        self._duration = [metrics.duration.labels(route, v) for v in VERSIONS]
        self._children: dict[int, Counter] = {}  # by slot, the request and decision counters
        self.nginx: NginxRouteSeries | None = None

    def enter(self, version: str) -> None:
        self.values[_VERSION[version]] += 1

    def move(self, version: str, to: str) -> None:
        values = self.values
        values[_VERSION[version]] -= 1
        values[_VERSION[to]] += 1

    def leave(self, version: str, rule: str, code: int, method: str, seconds: float) -> None:
        """A request done: out of flight, counted, timed, and its routing decision counted."""
        self.values[_VERSION[version]] -= 1
        self.request(version, code, method, seconds)
        self.decision(version, rule)

    def request(self, version: str, code: int, method: str, seconds: float) -> None:
        values = self.values
        v = _VERSION[version]
        values[_SUM + v] += seconds
        values[_FIRST_BUCKET[v] + bisect_left(DURATION_BUCKETS, seconds)] += 1  # first le >= seconds
        label = method if method in KNOWN_METHODS else "OTHER"
        slot = self._slots.get((version, code, label))
        if slot is None or slot >= len(values):
            slot = self._slot((version, code, label))
        values[slot] += 1
        if self.nginx is not None:
            self.nginx.request(version, code, label, seconds)

    def decision(self, version: str, rule: str) -> None:
        values = self.values
        slot = self._slots.get((version, rule))
        if slot is None or slot >= len(values):
            slot = self._slot((version, rule))
        values[slot] += 1

    def _slot(self, labels: tuple[str, int, str] | tuple[str, str]) -> int:
        slot = self._metrics.slot(labels)
        values = self.values
        if slot >= len(values):
            values.extend(array("d", bytes(8 * (slot + 1 - len(values)))))
        return slot

    def flush(self, *, nginx: bool = True) -> None:
        now = self.values.tolist()  # one C call: a consistent copy from whatever thread
        flushed = self._flushed
        if now != flushed:
            flushed += [0.0] * (len(now) - len(flushed))  # the array grew since
            for slot, (value, before) in enumerate(zip(now, flushed, strict=True)):
                if value != before:
                    self._send(slot, value - before)
            self._flushed = now
        if nginx and self.nginx is not None:
            self.nginx.flush()

    def _send(self, slot: int, delta: float) -> None:
        if slot < _SUM:
            self._in_flight[slot].inc(delta)
        elif slot < _FIRST_BUCKET[0]:
            self._duration[slot - _SUM]._sum.inc(delta)
        elif slot < _FIXED:
            version, bucket = divmod(slot - _FIRST_BUCKET[0], _BUCKETS)
            # prometheus_client has no public call that adds n observations to one bucket;
            # test_metrics_flush.py checks this attribute and _sum against Histogram.observe.
            self._duration[version]._buckets[bucket].inc(delta)
        else:
            child = self._children.get(slot)
            if child is None:
                child = self._children[slot] = self._metrics.child(self.route, slot)
            child.inc(delta)


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
        # Every label set's observations, kept across an Ingress's changes of labels.
        self._observed: dict[tuple[str, ...], _Observed] = {}

    def observed(self, labels: tuple[str, ...]) -> _Observed:
        found = self._observed.get(labels)
        if found is None:
            child = self.response_duration.labels(*labels)
            found = self._observed[labels] = _Observed(child, len(NGINX_BUCKETS))
        return found

    def flush(self) -> None:
        for observed in list(self._observed.values()):
            observed.flush()


def _origin_labels(origin: Origin) -> tuple[str, ...]:
    return (origin.namespace, origin.ingress, origin.service, origin.host, origin.path, origin.canary)


class NginxRouteSeries:
    """A route read from an Ingress: its ingress-nginx histogram, by its Ingress's labels
    (rebuilt when they change: a canary Ingress came or went, a backend Service changed).

    As ingress-nginx labels a request: ``ingress``, ``service``, ``host`` and ``path`` are the
    main Ingress's rule (a canary request too: ingress-nginx serves it from the main
    Ingress's location), and ``canary`` is "" for stable and the canary upstream's
    ``NAMESPACE-SERVICE-PORT`` for the canary. ``status`` is the status sent to the client.
    """

    __slots__ = ("_canary", "_counts", "_nginx", "_observed", "origin_labels")

    def __init__(self, nginx: NginxMetrics, origin: Origin) -> None:
        self._nginx = nginx
        self.origin_labels = _origin_labels(origin)
        # ingress-nginx's ``canary``: the alternative upstream's name, "" for the main one.
        self._canary = {version: origin.canary if version == CANARY else "" for version in VERSIONS}
        # None at zero: ingress-nginx has no series before a request (Flagger: "no values").
        self._counts: dict[tuple[str, int, str], list[float]] = {}
        self._observed: list[_Observed] = []

    def request(self, version: str, code: int, method_label: str, seconds: float) -> None:
        counts = self._counts.get((version, code, method_label))
        if counts is None:
            namespace, ingress, service, host, path, _ = self.origin_labels
            labels = (str(code), method_label, path, namespace, ingress, service, self._canary[version], host)
            observed = self._nginx.observed(labels)
            self._observed.append(observed)
            counts = self._counts[(version, code, method_label)] = observed.counts
        counts[bisect_left(NGINX_BUCKETS, seconds)] += 1
        counts[-1] += seconds

    def flush(self) -> None:
        for observed in self._observed[:]:
            observed.flush()


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
