"""Per-request metric changes, summed over one batch of the event loop and applied at its end.

A prometheus_client child's ``inc`` is several calls and a lock; under load a batch
(``ProxyServer.run_batch``) begins and accounts dozens of requests on the same few series,
whose in-flight gauges mostly net out within it. So the batch counts in plain ints and
applies each sum once, before it returns: the event loop runs no other callback in between,
so a scrape never sees a batch half applied.
"""

from __future__ import annotations

from prometheus_client import Gauge

from ..metrics import RouteSeries


class Tally:
    """The in-flight changes and routing decisions of the batch being run."""

    __slots__ = ("_decisions", "_gauges")

    def __init__(self) -> None:
        self._gauges: dict[Gauge, int] = {}
        self._decisions: dict[tuple[RouteSeries, str, str], int] = {}

    def in_flight(self, series: RouteSeries, version: str, delta: int) -> None:
        child = series.in_flight[version]
        gauges = self._gauges
        gauges[child] = gauges.get(child, 0) + delta

    def decision(self, series: RouteSeries, version: str, rule: str) -> None:
        key = (series, version, rule)
        decisions = self._decisions
        decisions[key] = decisions.get(key, 0) + 1

    def apply(self) -> None:
        """Hand the sums to their children, and start afresh."""
        gauges, self._gauges = self._gauges, {}
        for child, delta in gauges.items():
            if delta:  # most batches' entries and exits cancel out
                child.inc(delta)
        decisions, self._decisions = self._decisions, {}
        for (series, version, rule), count in decisions.items():
            series.decision(version, rule, count)
