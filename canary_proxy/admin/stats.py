"""The admin port's ``/stats``: per-version rates, error rates and latency over the last minutes.

Fed by the very collectors ``/metrics`` exports (the process's registry, or with
``--workers N`` the multiprocess collector): no second set of counters is kept. Once a
second the ``Sampler`` reads the cumulative counters and histogram buckets into a ring
buffer; ``stats_document`` turns each pair of consecutive snapshots into one point -- a
per-second rate, a 5xx share and p50/p99 from the bucket increase, as Prometheus'
``rate()`` and ``histogram_quantile()`` would over that second.

Everything but ``Sampler.run`` is pure: a snapshot is built from metric families, and a
document from snapshots.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from prometheus_client.metrics_core import Metric

from ..control import RolloutNotes
from ..metrics import NAMESPACE
from ..rollout.analysis import histogram_quantile
from ..rollout.report import status_report
from ..rollout.state import StateError, decode
from ..rollout.store import FileStore, Stored
from ..router import VERSIONS

log = logging.getLogger(__name__)

SAMPLE_INTERVAL: Final = 1.0  # seconds between snapshots: one chart point per second
HISTORY: Final = 300  # points kept: the charts show the last five minutes
DECISION_WINDOW: Final = 10  # points over which the routing-decision rates are averaged

REQUESTS: Final = f"{NAMESPACE}_requests"
DURATION: Final = f"{NAMESPACE}_request_duration_seconds"
DECISIONS: Final = f"{NAMESPACE}_routing_decisions"
WEIGHT_RATIO: Final = f"{NAMESPACE}_canary_weight_ratio"

Buckets = tuple[tuple[float, float], ...]  # cumulative (le, count), +Inf included


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The cumulative values at one instant, as a scrape of /metrics would show them."""

    time: float  # unix seconds
    requests: Mapping[str, float]  # version -> responses
    errors: Mapping[str, float]  # version -> 5xx responses
    buckets: Mapping[str, Buckets]  # version -> latency histogram
    decisions: Mapping[tuple[str, str], float]  # (version, rule) -> decisions
    weight_ratio: float | None  # the canary's configured share, 0..1


class Collector(Protocol):
    def collect(self) -> Iterable[Metric]: ...


def snapshot(families: Iterable[Metric], now: float) -> Snapshot:
    """One snapshot from metric families (``registry.collect()``)."""
    requests = dict.fromkeys(VERSIONS, 0.0)
    errors = dict.fromkeys(VERSIONS, 0.0)
    buckets: dict[str, dict[float, float]] = {v: {} for v in VERSIONS}
    decisions: dict[tuple[str, str], float] = {}
    weight: float | None = None
    for family in families:
        for sample in family.samples:
            labels, value = sample.labels, sample.value
            if family.name == REQUESTS and sample.name == REQUESTS + "_total":
                version = labels.get("version", "")
                requests[version] = requests.get(version, 0.0) + value
                if labels.get("code", "").startswith("5"):
                    errors[version] = errors.get(version, 0.0) + value
            elif family.name == DURATION and sample.name == DURATION + "_bucket":
                per = buckets.setdefault(labels.get("version", ""), {})
                le = float(labels["le"])
                per[le] = per.get(le, 0.0) + value
            elif family.name == DECISIONS and sample.name == DECISIONS + "_total":
                key = (labels.get("version", ""), labels.get("rule", ""))
                decisions[key] = decisions.get(key, 0.0) + value
            elif family.name == WEIGHT_RATIO:
                weight = value
    return Snapshot(
        time=now,
        requests=requests,
        errors=errors,
        buckets={v: tuple(sorted(b.items())) for v, b in buckets.items()},
        decisions=decisions,
        weight_ratio=weight,
    )


def _increase(now: float, before: float) -> float:
    """A counter's increase; one that went down belongs to a restarted process: no data."""
    return max(0.0, now - before)


def _bucket_increase(now: Buckets, before: Buckets) -> list[tuple[float, float]]:
    previous = dict(before)
    return [(le, _increase(count, previous.get(le, 0.0))) for le, count in now]


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def point(before: Snapshot, now: Snapshot, version: str) -> dict[str, float | None]:
    """One version between two snapshots: requests/s, 5xx share (0..1), p50 and p99 (seconds).

    The share and the quantiles are None (a gap in the chart) when it served nothing.
    """
    elapsed = max(now.time - before.time, 1e-9)
    served = _increase(now.requests.get(version, 0.0), before.requests.get(version, 0.0))
    failed = _increase(now.errors.get(version, 0.0), before.errors.get(version, 0.0))
    latency = _bucket_increase(now.buckets.get(version, ()), before.buckets.get(version, ()))
    return {
        "requestRate": _round(served / elapsed, 3),
        "errorRate": _round(min(1.0, failed / served)) if served > 0 else None,
        "p50": _round(histogram_quantile(0.5, latency)),
        "p99": _round(histogram_quantile(0.99, latency)),
    }


def series(snapshots: Sequence[Snapshot]) -> dict[str, Any]:
    """Columns for the charts, oldest first: ``time`` and, per version, one value per point."""
    pairs = list(itertools.pairwise(snapshots))
    out: dict[str, Any] = {
        "time": [round(now.time, 3) for _, now in pairs],
        "weightPercent": [
            None if now.weight_ratio is None else round(now.weight_ratio * 100, 4) for _, now in pairs
        ],
    }
    for version in VERSIONS:
        points = [point(before, now, version) for before, now in pairs]
        out[version] = {key: [p[key] for p in points] for key in ("requestRate", "errorRate", "p50", "p99")}
    return out


def decisions(snapshots: Sequence[Snapshot], *, window: int = DECISION_WINDOW) -> list[dict[str, Any]]:
    """Routing decisions by version and rule: the total, and the rate over the last points."""
    if not snapshots:
        return []
    now = snapshots[-1]
    before = snapshots[max(0, len(snapshots) - 1 - window)]
    elapsed = now.time - before.time
    rows = []
    for (version, rule), total in sorted(now.decisions.items()):
        increase = _increase(total, before.decisions.get((version, rule), 0.0))
        rate = increase / elapsed if elapsed > 0 else None
        rows.append({"version": version, "rule": rule, "total": total, "rate": _round(rate, 3)})
    return rows


def totals(snapshots: Sequence[Snapshot]) -> dict[str, dict[str, float]]:
    if not snapshots:
        return {v: {"requests": 0.0, "errors": 0.0} for v in VERSIONS}
    now = snapshots[-1]
    return {v: {"requests": now.requests.get(v, 0.0), "errors": now.errors.get(v, 0.0)} for v in VERSIONS}


def stats_document(
    snapshots: Sequence[Snapshot],
    *,
    effective: Mapping[str, Any] | None,
    rollout: Mapping[str, Any] | None,
    interval: float = SAMPLE_INTERVAL,
) -> dict[str, Any]:
    """The ``/stats`` JSON (its shape is documented in the README)."""
    weight = None
    if effective is not None:
        value, total = effective["canary-weight"], effective["canary-weight-total"]
        weight = {"weight": value, "total": total, "percent": round(float(value) * 100 / total, 4)}
    return {
        "time": round(snapshots[-1].time, 3) if snapshots else None,
        "interval": interval,
        "weight": weight,
        "rollout": rollout,
        "config": effective,
        "series": series(snapshots),
        "decisions": decisions(snapshots),
        "totals": totals(snapshots),
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
        self.ring: deque[Snapshot] = deque(maxlen=history + 1)  # n + 1 snapshots make n points
        self.rollout: dict[str, Any] | None = None

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
        self.ring.append(taken)  # in the loop's thread: handlers never see it half-appended
        self.rollout = rollout

    async def run(
        self,
        current_data: Callable[[], Mapping[str, Any] | None],
        current_notes: Callable[[], RolloutNotes | None] = lambda: None,
    ) -> None:
        """Sample until cancelled; ``current_data()`` is the raw config now and
        ``current_notes()`` the rollout annotations that came with it (for the rollout)."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.sample(current_data(), current_notes())
            except Exception:  # a stats hiccup must never take the admin port down
                log.exception("stats sample failed")
            next_at = max(next_at + self.interval, loop.time())
            await asyncio.sleep(next_at - loop.time())
