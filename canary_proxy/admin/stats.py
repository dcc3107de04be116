"""The admin port's ``/stats``: each route's per-version rates, error rates and latency over the last minutes.

Fed by the very collectors ``/metrics`` exports (the process's registry, or with
``--workers N`` the multiprocess collector): no second set of counters is kept. Once a
second the ``Sampler`` reads every route's cumulative counters and histogram buckets (a
``Snapshot``), and the ``History`` turns each pair of consecutive snapshots into one point
per route -- a per-second rate, a 5xx share and p50/p99 from the bucket increase, as
Prometheus' ``rate()`` and ``histogram_quantile()`` would over that second.

The history keeps those points, not the snapshots: a route's five minutes are nine flat
arrays of 300 numbers (22 KB). Only the last snapshot is kept whole (the next point is taken
against it), and of the 10 before it only the routing-decision counts, for their rates: a
whole snapshot of a route, with its latency buckets, is about 6 KB, so keeping 11 of them
had cost a proxy with 1,000 routes 66 MB.

Everything but ``Sampler.run`` is pure: a snapshot is built from metric families, and a
document from the history.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from array import array
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from prometheus_client.metrics_core import Metric

from ..control import RolloutNotes
from ..metrics import NAMESPACE
from ..rollout.analysis import histogram_quantile
from ..rollout.report import status_report
from ..rollout.state import StateError, decode
from ..rollout.store import FileStore, Stored
from ..router import DEFAULT_ROUTE, UNROUTED, VERSIONS

log = logging.getLogger(__name__)

SAMPLE_INTERVAL: Final = 1.0  # seconds between snapshots: one chart point per second
HISTORY: Final = 300  # points kept per route: the charts show the last five minutes
# Snapshots are taken only while someone reads /stats (the dashboard polls it each second),
# and for this long after: reading every series costs a proxy with 1,000 routes a quarter of a
# second of CPU per snapshot, which nobody should pay while no one looks.
WATCHED_FOR: Final = 120.0
# With at most this many routes, snapshots are also taken for the first WATCHED_FOR seconds
# after start, before anyone reads /stats, so a dashboard opened then charts the traffic from
# the start. A snapshot costs about 0.25 ms a route: 20 routes are 0.5 % of a core. A proxy
# with more pays nothing per route until someone looks (the bench of 1,000 routes ran inside
# those first two minutes, with a third of its CPU going to snapshots nobody read).
UNWATCHED_ROUTES: Final = 20
DECISION_WINDOW: Final = 10  # points over which the routing-decision rates are averaged

REQUESTS: Final = f"{NAMESPACE}_requests"
DURATION: Final = f"{NAMESPACE}_request_duration_seconds"
DECISIONS: Final = f"{NAMESPACE}_routing_decisions"
WEIGHT_RATIO: Final = f"{NAMESPACE}_canary_weight_ratio"

POINT_KEYS: Final = ("requestRate", "errorRate", "p50", "p99")  # one version's values at a point
WEIGHT: Final = "weightPercent"
COLUMNS: Final = (WEIGHT, *(f"{version}.{key}" for version in VERSIONS for key in POINT_KEYS))

Buckets = tuple[tuple[float, float], ...]  # cumulative (le, count), +Inf included


@dataclass(frozen=True, slots=True)
class Counts:
    """One route's cumulative values at one instant, as a scrape of /metrics would show them."""

    requests: Mapping[str, float] = field(default_factory=dict)  # version -> responses
    errors: Mapping[str, float] = field(default_factory=dict)  # version -> 5xx responses
    buckets: Mapping[str, Buckets] = field(default_factory=dict)  # version -> latency histogram
    decisions: Mapping[tuple[str, str], float] = field(default_factory=dict)  # (version, rule) -> n
    weight_ratio: float | None = None  # the canary's configured share, 0..1

    @property
    def served(self) -> float:
        return sum(self.requests.values())


NO_COUNTS: Final = Counts()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every route's cumulative values at one instant (unix seconds)."""

    time: float
    routes: Mapping[str, Counts]

    def of(self, route: str) -> Counts:
        """A route the snapshot does not know has served nothing yet."""
        return self.routes.get(route, NO_COUNTS)


class Collector(Protocol):
    def collect(self) -> Iterable[Metric]: ...


class _Route:
    """One route's values while a snapshot is being read."""

    def __init__(self) -> None:
        self.requests = dict.fromkeys(VERSIONS, 0.0)
        self.errors = dict.fromkeys(VERSIONS, 0.0)
        self.buckets: dict[str, dict[float, float]] = {v: {} for v in VERSIONS}
        self.decisions: dict[tuple[str, str], float] = {}
        self.weight: float | None = None

    def counts(self) -> Counts:
        buckets = {v: tuple(sorted(b.items())) for v, b in self.buckets.items()}
        return Counts(self.requests, self.errors, buckets, self.decisions, self.weight)


def snapshot(families: Iterable[Metric], now: float) -> Snapshot:
    """One snapshot from metric families (``registry.collect()``), by their ``route`` label.

    Requests no route took (``route="none"``) are left out: they have no version to chart.
    """
    routes: defaultdict[str, _Route] = defaultdict(_Route)
    for family in families:
        if family.name not in (REQUESTS, DURATION, DECISIONS, WEIGHT_RATIO):
            continue
        for sample in family.samples:
            labels, value = sample.labels, sample.value
            name = labels.get("route", DEFAULT_ROUTE)
            if name == UNROUTED:
                continue
            if family.name == REQUESTS and sample.name == REQUESTS + "_total":
                route, version = routes[name], labels.get("version", "")
                route.requests[version] = route.requests.get(version, 0.0) + value
                if labels.get("code", "").startswith("5"):
                    route.errors[version] = route.errors.get(version, 0.0) + value
            elif family.name == DURATION and sample.name == DURATION + "_bucket":
                per = routes[name].buckets.setdefault(labels.get("version", ""), {})
                le = float(labels["le"])
                per[le] = per.get(le, 0.0) + value
            elif family.name == DECISIONS and sample.name == DECISIONS + "_total":
                decisions = routes[name].decisions
                key = (labels.get("version", ""), labels.get("rule", ""))
                decisions[key] = decisions.get(key, 0.0) + value
            elif family.name == WEIGHT_RATIO:
                routes[name].weight = value
    return Snapshot(time=now, routes={name: route.counts() for name, route in routes.items()})


def _increase(now: float, before: float) -> float:
    """A counter's increase; one that went down belongs to a restarted process: no data."""
    return max(0.0, now - before)


def _bucket_increase(now: Buckets, before: Buckets) -> list[tuple[float, float]]:
    previous = dict(before)
    return [(le, _increase(count, previous.get(le, 0.0))) for le, count in now]


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def point(before: Counts, now: Counts, version: str, elapsed: float) -> dict[str, float | None]:
    """One version of one route over ``elapsed`` seconds: requests/s, 5xx share (0..1), p50
    and p99 (seconds). The share and the quantiles are None (a gap in the chart) when it
    served nothing."""
    elapsed = max(elapsed, 1e-9)
    served = _increase(now.requests.get(version, 0.0), before.requests.get(version, 0.0))
    failed = _increase(now.errors.get(version, 0.0), before.errors.get(version, 0.0))
    latency = _bucket_increase(now.buckets.get(version, ()), before.buckets.get(version, ()))
    return {
        "requestRate": _round(served / elapsed, 3),
        "errorRate": _round(min(1.0, failed / served)) if served > 0 else None,
        "p50": _round(histogram_quantile(0.5, latency)),
        "p99": _round(histogram_quantile(0.99, latency)),
    }


def row(before: Counts, now: Counts, elapsed: float) -> dict[str, float | None]:
    """One route's point: the value of each of ``COLUMNS``."""
    weight = now.weight_ratio
    values: dict[str, float | None] = {WEIGHT: None if weight is None else round(weight * 100, 4)}
    for version in VERSIONS:
        for key, value in point(before, now, version, elapsed).items():
            values[f"{version}.{key}"] = value
    return values


Decisions = Mapping[str, Mapping[tuple[str, str], float]]  # route -> (version, rule) -> n


class History:
    """Each route's chart points, oldest first: at most ``size``, one per pair of consecutive
    snapshots (n + 1 snapshots make n points). A gap (None) is stored as NaN in a flat array
    of doubles. The last snapshot is kept whole (``latest``, for ``totals`` and the next
    point), and the decision counts of the last ``window`` + 1, for ``decisions``. Fed from
    one thread (the event loop's): a reader never sees half a point."""

    def __init__(self, size: int = HISTORY, *, window: int = DECISION_WINDOW) -> None:
        self.size = size
        self.times: deque[float] = deque(maxlen=size)
        self.charts: dict[str, dict[str, array[float]]] = {}
        self.latest: Snapshot | None = None
        self.decided: deque[tuple[float, Decisions]] = deque(maxlen=window + 1)

    def add(self, now: Snapshot) -> None:
        before = self.latest
        self.latest = now
        self.decided.append((now.time, {route: counts.decisions for route, counts in now.routes.items()}))
        if before is None:
            return  # a baseline only
        self.times.append(now.time)
        for route in now.routes.keys() - self.charts.keys():  # new: a gap until now
            self.charts[route] = {c: array("d", [math.nan] * (len(self.times) - 1)) for c in COLUMNS}
        for route, columns in self.charts.items():
            values = row(before.of(route), now.of(route), now.time - before.time)
            for column, numbers in columns.items():
                value = values[column]
                numbers.append(math.nan if value is None else value)
                if len(numbers) > self.size:
                    del numbers[0]

    def series(self, route: str) -> dict[str, Any]:
        """The route's columns for the charts: ``time``, ``weightPercent`` and per version one
        value per point (a route not seen yet: all gaps)."""
        columns = self.charts.get(route)

        def values(column: str) -> list[float | None]:
            if columns is None:
                return [None] * len(self.times)
            return [None if math.isnan(v) else v for v in columns[column]]

        out: dict[str, Any] = {"time": [round(t, 3) for t in self.times], WEIGHT: values(WEIGHT)}
        for version in VERSIONS:
            out[version] = {key: values(f"{version}.{key}") for key in POINT_KEYS}
        return out

    def decisions(self, route: str) -> list[dict[str, Any]]:
        """The route's routing decisions by version and rule: the total, and the rate over the
        last ``window`` points."""
        if not self.decided:
            return []
        (first, earliest), (last, latest) = self.decided[0], self.decided[-1]
        now, before = latest.get(route, {}), earliest.get(route, {})
        elapsed = last - first
        rows = []
        for (version, rule), total in sorted(now.items()):
            increase = _increase(total, before.get((version, rule), 0.0))
            rate = increase / elapsed if elapsed > 0 else None
            rows.append({"version": version, "rule": rule, "total": total, "rate": _round(rate, 3)})
        return rows

    def totals(self, route: str) -> dict[str, dict[str, float]]:
        now = self.latest.of(route) if self.latest is not None else NO_COUNTS
        return {v: {"requests": now.requests.get(v, 0.0), "errors": now.errors.get(v, 0.0)} for v in VERSIONS}


def offered_routes(latest: Snapshot | None, configured: Sequence[str]) -> list[str]:
    """The routes the page offers: the served ones, in the config's order, then any other
    route label of the metrics that served requests (a route removed since: its history
    stays). A label at zero that no config names -- the ``default`` series a proxy creates
    before it knows its routes -- is no route."""
    labels = latest.routes if latest is not None else {}
    others = sorted(name for name, c in labels.items() if name not in configured and c.served > 0)
    return [*configured, *others]


def stats_document(
    history: History,
    *,
    route: str = DEFAULT_ROUTE,
    routes: Sequence[str] = (),
    effective: Mapping[str, Any] | None,
    rollout: Mapping[str, Any] | None,
    interval: float = SAMPLE_INTERVAL,
) -> dict[str, Any]:
    """The ``/stats`` JSON of one ``route`` (its shape is documented in docs/demo.md);
    ``routes`` are those the page may offer, ``effective`` is the route's effective config."""
    weight = None
    if effective is not None:
        value, total = effective["canary-weight"], effective["canary-weight-total"]
        weight = {"weight": value, "total": total, "percent": round(float(value) * 100 / total, 4)}
    latest = history.latest
    return {
        "time": round(latest.time, 3) if latest is not None else None,
        "interval": interval,
        "route": route,
        "routes": list(routes),
        "weight": weight,
        "rollout": rollout,
        "config": effective,
        "series": history.series(route),
        "decisions": history.decisions(route),
        "totals": history.totals(route),
    }


# -- the rollout: beside the config file, or in the ConfigMap's annotations ------------------


def rollout_report(
    store: str, data: Mapping[str, Any] | None, notes: Mapping[str, str]
) -> dict[str, Any] | None:
    """``notes`` decoded and shaped as ``status -o json`` (the one format of both stores);
    None if no rollout is recorded. Raises StateError if they cannot be read back."""
    state = decode(notes)
    if state.phase is None:
        return None
    return status_report(store, Stored(dict(data or {}), notes), state)


def notes_rollout(notes: RolloutNotes, data: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The rollout recorded in a ConfigMap's annotations, as ``status -o json``; None if none."""
    try:
        return rollout_report(notes.store, data, notes.annotations)
    except StateError as exc:  # edited by hand, or another tool's: say so
        return {"store": notes.store, "phase": None, "error": f"{notes.store}: {exc}"}


def read_rollout(config_path: str | None, data: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The rollout recorded beside the config file, shaped as ``status -o json``; None if none.

    Blocking (a small file read): call it from a thread.
    """
    if config_path is None:
        return None
    files = FileStore(config_path)  # only for its paths and name: nothing is locked or written
    path, store = files.state_path, files.description
    try:
        notes = json.loads(path.read_text())
        if not isinstance(notes, dict):
            raise ValueError("expected a JSON object")
        return rollout_report(store, data, {str(k): str(v) for k, v in notes.items()})
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # mid-write, or edited by hand (a StateError): say so
        return {"store": store, "phase": None, "error": f"{path}: {exc}"}


# -- the sampler -------------------------------------------------------------------------------


class Sampler:
    """Snapshots the collectors (and reads the rollout state) once per ``interval``.

    The rollout comes from the annotations the config source delivered (ConfigMap mode) or,
    without them, from the state file beside ``config_path`` (file mode).
    """

    def __init__(
        self,
        collector: Collector,
        *,
        config_path: str | None = None,
        interval: float = SAMPLE_INTERVAL,
        history: int = HISTORY,
    ) -> None:
        self.collector = collector
        self.config_path = config_path
        self.interval = interval
        self.history = History(history)
        self.rollout: dict[str, Any] | None = None
        self.start_until = time.monotonic() + WATCHED_FOR  # with few routes: see UNWATCHED_ROUTES
        self.watched_until = 0.0  # per read

    def watched(self) -> None:
        """Someone read /stats: keep sampling for another WATCHED_FOR seconds."""
        self.watched_until = time.monotonic() + WATCHED_FOR

    def due(self, routes: int) -> bool:
        """Whether to take a snapshot now, for a proxy serving ``routes`` routes."""
        now = time.monotonic()
        return now < self.watched_until or (routes <= UNWATCHED_ROUTES and now < self.start_until)

    def read(
        self, data: Mapping[str, Any] | None, notes: RolloutNotes | None = None
    ) -> tuple[Snapshot, dict[str, Any] | None]:
        """Blocking: the multiprocess collector reads files, and so does the rollout state."""
        taken = snapshot(self.collector.collect(), time.time())
        if notes is not None:
            return taken, notes_rollout(notes, data)
        return taken, read_rollout(self.config_path, data)

    async def sample(self, data: Mapping[str, Any] | None = None, notes: RolloutNotes | None = None) -> None:
        taken, rollout = await asyncio.to_thread(self.read, data, notes)
        self.history.add(taken)  # in the loop's thread: handlers never see half a point
        self.rollout = rollout

    async def run(
        self,
        current_data: Callable[[], Mapping[str, Any] | None],
        current_notes: Callable[[], RolloutNotes | None] = lambda: None,
        current_routes: Callable[[], int] = lambda: 1,
    ) -> None:
        """Sample until cancelled; ``current_data()`` is the raw config now,
        ``current_notes()`` the rollout annotations that came with it (for the rollout), and
        ``current_routes()`` how many routes are served."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                if self.due(current_routes()):
                    await self.sample(current_data(), current_notes())
            except Exception:  # a stats hiccup must never take the admin port down
                log.exception("stats sample failed")
            next_at = max(next_at + self.interval, loop.time())
            await asyncio.sleep(next_at - loop.time())
