"""One analysis check: the canary's error rate and p99 against limits and against stable. Pure.

A check has three outcomes, as in Flagger:

- **inconclusive** -- the canary served fewer than ``min_requests`` requests in the window
  (or its latency is unknown, or the metrics could not be read). Never a failure, never a
  reason to promote: "no data" must not look like "healthy".
- **fail** -- any limit is exceeded.
- **pass** -- every limit that applies holds.

Limits: absolute (``max_error_rate``, ``max_p99``) always apply. Relative limits compare with
stable over the same window: error rate at most stable's plus ``max_error_rate_increase``
(percentage points), p99 at most stable's times ``max_p99_increase``. They apply only while
stable still serves traffic (below 100 %) and served at least ``min_requests`` itself in
the window; a thinner baseline is noise, and the check says it skipped them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..values import format_duration

Result = Literal["pass", "fail", "inconclusive"]
PASS: Result = "pass"
FAIL: Result = "fail"
INCONCLUSIVE: Result = "inconclusive"


# -- inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VersionStats:
    """One version over one window: request and 5xx counts, and p99 latency in seconds."""

    requests: float = 0.0
    errors: float = 0.0  # responses with a 5xx status
    p99: float | None = None  # None: no latency data in the window

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests > 0 else None


@dataclass(frozen=True, slots=True)
class Window:
    """What a metric source saw for both versions over the same window."""

    stable: VersionStats
    canary: VersionStats
    mirror: VersionStats | None = None  # the copies mirrored to the canary, if asked for

    def mirrored(self) -> Window:
        """The window a ``mirror`` step judges: the canary as its mirrored copies show it
        (an ``error`` or ``timeout`` copy counts as a 5xx), against stable."""
        return Window(stable=self.stable, canary=self.mirror or VersionStats())


class SourceError(Exception):
    """The metrics could not be read (unreachable, bad answer): the check is inconclusive."""


class MetricSource(Protocol):
    """Where windows come from (as Flagger's metric providers): Prometheus, or the proxies'
    own ``/metrics``. ``sample`` raises SourceError when it cannot answer."""

    async def sample(self, window: float) -> Window:
        """Both versions over the last ``window`` seconds (a scraping source: since its last
        sample, whatever ``window`` says)."""
        ...


# -- thresholds -----------------------------------------------------------------------------

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|pp)?\s*$")
_FACTOR = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*x?\s*$")


def parse_percent(text: str) -> float:
    """``1%``, ``0.5``, ``0.5pp`` -> a fraction (0.01, 0.005, 0.005). A bare number is percent."""
    m = _PERCENT.match(str(text))
    if not m or float(m.group(1)) > 100:
        raise ValueError("a percentage from 0 to 100, such as 1% or 0.5")
    return float(m.group(1)) / 100


def parse_factor(text: str) -> float:
    """``2x`` or ``2`` -> 2.0; at least 1 (the canary may never be required to beat stable)."""
    m = _FACTOR.match(str(text))
    if not m or float(m.group(1)) < 1:
        raise ValueError("a factor of at least 1, such as 2x or 1.5")
    return float(m.group(1))


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The limits of one check. Defaults are the ``rollout`` command's defaults."""

    max_error_rate: float = 0.01  # fraction: 1 %
    max_p99: float = 0.5  # seconds
    max_error_rate_increase: float = 0.005  # fraction above stable's rate: 0.5 percentage points
    max_p99_increase: float = 2.0  # factor of stable's p99
    min_requests: int = 100  # canary requests per window below which a check is inconclusive

    def __post_init__(self) -> None:
        if not (0 <= self.max_error_rate <= 1 and 0 <= self.max_error_rate_increase <= 1):
            raise ValueError("error-rate limits must be fractions from 0 to 1")
        if self.max_p99 <= 0 or self.max_p99_increase < 1 or self.min_requests < 1:
            raise ValueError("need max_p99 > 0, max_p99_increase >= 1, min_requests >= 1")

    def as_dict(self) -> dict[str, Any]:
        return {
            "maxErrorRate": self.max_error_rate,
            "maxP99": self.max_p99,
            "maxErrorRateIncrease": self.max_error_rate_increase,
            "maxP99Increase": self.max_p99_increase,
            "minRequests": self.min_requests,
        }


# -- the verdict ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    """One comparison: ``value <= limit``, with the words that explain it."""

    name: str  # error-rate, error-rate-vs-stable, p99, p99-vs-stable
    value: float
    limit: float
    text: str  # e.g. "error rate 3.10% > max 1.00%"

    @property
    def ok(self) -> bool:
        return self.value <= self.limit


@dataclass(frozen=True, slots=True)
class Verdict:
    result: Result
    reasons: tuple[str, ...]  # why: the failed checks, or why it is inconclusive
    checks: tuple[Check, ...] = ()  # every comparison made, passed or not
    window: Window | None = None
    notes: tuple[str, ...] = field(default=())  # e.g. relative limits skipped, and why

    def summary(self) -> str:
        """One line with every number compared, for the log and ``status``."""
        parts = []
        if self.window is not None:
            parts.append(f"canary {describe_stats(self.window.canary)}")
            parts.append(f"stable {describe_stats(self.window.stable)}")
        parts += [f"{c.text} {'ok' if c.ok else 'FAIL'}" for c in self.checks]
        parts += list(self.notes)
        if self.result == INCONCLUSIVE:
            parts += list(self.reasons)
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """The numbers, for the ``canary-proxy.io/last-analysis`` annotation."""
        out: dict[str, Any] = {"result": self.result, "reasons": list(self.reasons)}
        if self.window is not None:
            out["canary"] = stats_dict(self.window.canary)
            out["stable"] = stats_dict(self.window.stable)
        out["checks"] = [
            {"name": c.name, "value": c.value, "limit": c.limit, "ok": c.ok} for c in self.checks
        ]
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def fmt_rate(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate * 100:.2f}%"


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1000:.1f}ms" if seconds < 10 else format_duration(seconds)


def describe_stats(stats: VersionStats) -> str:
    return (
        f"{stats.requests:.0f} req, {stats.errors:.0f} 5xx ({fmt_rate(stats.error_rate)}), "
        f"p99 {fmt_seconds(stats.p99)}"
    )


def stats_dict(stats: VersionStats) -> dict[str, Any]:
    return {
        "requests": round(stats.requests, 3),
        "errors": round(stats.errors, 3),
        "errorRate": stats.error_rate,
        "p99": stats.p99,
    }


def unavailable(reason: str) -> Verdict:
    """The verdict when no window could be read at all: inconclusive, never a failure."""
    return Verdict(INCONCLUSIVE, (f"metrics unavailable: {reason}",))


def verdict(window: Window, thresholds: Thresholds, *, relative: bool) -> Verdict:
    """Judge one window. ``relative=False`` at 100 %: stable then has no traffic to compare."""
    canary, stable = window.canary, window.stable
    t = thresholds
    if canary.requests < t.min_requests:
        why = f"canary served {canary.requests:.0f} requests, fewer than --min-requests {t.min_requests}"
        return Verdict(INCONCLUSIVE, (why,), window=window)
    if canary.p99 is None:
        return Verdict(INCONCLUSIVE, ("no canary latency data in the window",), window=window)
    rate = canary.error_rate or 0.0
    checks = [
        Check("error-rate", rate, t.max_error_rate, _cmp("error rate", rate, "max", t.max_error_rate)),
        Check("p99", canary.p99, t.max_p99, _cmp_s("p99", canary.p99, "max", t.max_p99)),
    ]
    notes: list[str] = []
    if not relative:
        notes.append("relative limits not applied: the canary serves 100%")
    elif stable.requests < t.min_requests:
        notes.append(f"relative limits skipped: stable served {stable.requests:.0f} < {t.min_requests}")
    else:
        checks += _relative(canary, stable, t)
    failed = tuple(c.text for c in checks if not c.ok)
    return Verdict(FAIL if failed else PASS, failed, tuple(checks), window, tuple(notes))


def _relative(canary: VersionStats, stable: VersionStats, t: Thresholds) -> list[Check]:
    rate, base = canary.error_rate or 0.0, stable.error_rate or 0.0
    limit = base + t.max_error_rate_increase
    label = f"stable {fmt_rate(base)} + {t.max_error_rate_increase * 100:g}pp"
    checks = [Check("error-rate-vs-stable", rate, limit, _cmp("error rate", rate, label, limit))]
    if stable.p99 is not None and canary.p99 is not None:
        limit = stable.p99 * t.max_p99_increase
        label = f"stable {fmt_seconds(stable.p99)} x {t.max_p99_increase:g}"
        checks.append(Check("p99-vs-stable", canary.p99, limit, _cmp_s("p99", canary.p99, label, limit)))
    return checks


def _cmp(what: str, value: float, label: str, limit: float) -> str:
    return _text(what, fmt_rate(value), value <= limit, label, fmt_rate(limit))


def _cmp_s(what: str, value: float, label: str, limit: float) -> str:
    return _text(what, fmt_seconds(value), value <= limit, label, fmt_seconds(limit))


def _text(what: str, value: str, ok: bool, label: str, limit: str) -> str:
    sign = "<=" if ok else ">"
    if label == "max":
        return f"{what} {value} {sign} max {limit}"
    return f"{what} {value} {sign} {label} = {limit}"


# -- histograms -----------------------------------------------------------------------------


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative ``(le, count)`` buckets.

    Linear interpolation inside the bucket holding the rank; a rank in the ``+Inf``
    bucket answers the highest finite bound. None when there are no observations.
    Counts made non-monotonic by deltas across a restart are clamped, as Prometheus does.
    """
    ordered = sorted(buckets)
    if not ordered or not math.isinf(ordered[-1][0]):
        return None
    counts: list[float] = []
    for _, count in ordered:
        counts.append(max(count, counts[-1]) if counts else max(count, 0.0))
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    for i, (le, count) in enumerate(zip((b[0] for b in ordered), counts, strict=True)):
        if count >= rank:
            if math.isinf(le):
                return ordered[i - 1][0] if i > 0 else None
            lower = ordered[i - 1][0] if i > 0 else 0.0
            below = counts[i - 1] if i > 0 else 0.0
            inside = count - below
            return le if inside <= 0 else lower + (le - lower) * (rank - below) / inside
    return None  # unreachable: the +Inf bucket holds the total
