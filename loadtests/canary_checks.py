"""The load test's judge: weight history, per-weight share with its bound, flips. Pure, no I/O.

The locustfile feeds it observations; it never imports Locust or gevent, so the tests can
check it with plain tables of cases (importing Locust would monkeypatch the test process).

**Which weight served a request.** The locustfile polls the proxy's ``/config``. A poll is
sent at ``sent`` and answered at ``received``; it shows the config as of some moment in
between. When two successive polls differ, the change happened in ``(previous.sent,
current.received)``, plus ``apply_slack`` for workers that apply a config a moment after
the supervisor's ``/config`` shows it. A request routed (some time between its own send and
receive) entirely outside every such window is attributed to the weight in force; one that
overlaps a window is *in transition* and left out of the share (it is counted, not judged).

**The share bound.** The share is judged per *user*, the unit the proxy draws a bucket for:
every API request is a new user (no cookie, a fresh draw), and a browser session is one
user whose requests all follow its one bucket, so under one weight it counts once (as the
version it first saw under that weight). Under weight ``p`` (the proxy's own rounding to
1/10000) these ``n`` users are independent draws ``X_k ~ Bernoulli(p)``, and Bernstein's
inequality bounds their canary count ``C`` for any ``n`` and ``p``, not just asymptotically:

    P(|C - p*n| >= t) <= 2 * exp(-t**2 / (2 * (V + M*t/3))),   V = p*(1-p)*n,  M = 1

Solving for the ``t`` that makes the right side ``delta`` gives the tolerance ``t / n``. With
``delta = 1e-6`` a correct proxy fails one check in a million by chance, so the check does
not flake; the tolerance shrinks as 1/sqrt(n) (about +/-2.7 % at p = 0.1 and 4,000 users,
+/-1.4 % at 15,000). Counting a sticky session's requests as independent draws would
understate the spread (by sqrt(10) for 10-request sessions) and fail a correct proxy; the
share of *requests* is reported too, for information only.

**Flips.** A browser session is one bucket, so under a constant weight it sees one version.
When it does see another, the flip is allowed only if a weight change that moves its bucket
that way could have happened between the two requests: stable -> canary needs a rise (the
canary owns the lowest buckets, so a rise moves users only that way), canary -> stable a
fall. Anything else is a violation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

BUCKETS = 10_000  # canary_proxy.config.BUCKETS
STABLE, CANARY = "stable", "canary"
DEFAULT_DELTA = 1e-6


def expected_share(weight: float, total: int) -> float:
    """The share the proxy routes to the canary: its buckets, rounded half up like
    ``canary_proxy.config.canary_buckets`` (copied so this file runs without the package)."""
    buckets = min(BUCKETS, max(0, math.floor(weight / total * BUCKETS + 0.5)))
    return buckets / BUCKETS


def bernstein_tolerance(p: float, *, n: int, sum_sq: float, max_cluster: float, delta: float) -> float:
    """Half-width of the share interval: ``|observed - p| <= this`` with probability 1-delta.

    ``n`` requests in clusters whose sizes squared sum to ``sum_sq``, the largest ``max_cluster``.
    """
    if n <= 0:
        return math.inf
    log_term = math.log(2 / delta)
    variance = p * (1 - p) * sum_sq
    linear = max_cluster * log_term / 3
    t = linear + math.sqrt(linear * linear + 2 * variance * log_term)
    return t / n


# -- the weight history ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Poll:
    sent: float
    received: float
    weight: float
    total: int

    @property
    def share(self) -> float:
        return expected_share(self.weight, self.total)


@dataclass(frozen=True, slots=True)
class Change:
    start: float  # the change came after this: the previous poll's send time
    end: float  # and by this: the receive time of the poll that saw it, plus the apply slack
    before: Poll
    after: Poll

    @property
    def direction(self) -> int:
        """+1 if the canary share rose, -1 if it fell, 0 if only the spelling changed."""
        a, b = self.before.share, self.after.share
        return (b > a) - (b < a)

    def overlaps(self, t0: float, t1: float) -> bool:
        return t0 < self.end and t1 > self.start


@dataclass(slots=True)
class WeightHistory:
    apply_slack: float = 0.5
    polls: list[Poll] = field(default_factory=list)  # only those whose value changed, plus the last
    changes: list[Change] = field(default_factory=list)
    last: Poll | None = None

    def record(self, poll: Poll) -> None:
        last = self.last
        if last is not None and (poll.weight, poll.total) != (last.weight, last.total):
            self.changes.append(Change(last.sent, poll.received + self.apply_slack, last, poll))
        if last is None or (poll.weight, poll.total) != (last.weight, last.total):
            self.polls.append(poll)
        self.last = poll

    @property
    def settled_until(self) -> float:
        """Observations received before this time can be attributed for good: any change
        not yet seen by a poll has a window that starts later."""
        return self.last.sent if self.last is not None else -math.inf

    def share_between(self, t0: float, t1: float) -> Poll | None:
        """The config in force for a request routed within [t0, t1], or None if that is
        ambiguous (it overlaps a change window, or comes before the first poll)."""
        if not self.polls or t0 < self.polls[0].sent:
            return None
        if any(c.overlaps(t0, t1) for c in self.changes):
            return None
        for change in reversed(self.changes):
            if change.end <= t0:
                return change.after
        return self.polls[0]

    def directions_between(self, t0: float, t1: float) -> set[int]:
        return {c.direction for c in self.changes if c.overlaps(t0, t1)}


# -- share per weight ------------------------------------------------------------------------


@dataclass(slots=True)
class PhaseStats:
    """Users and requests observed while one canary share was in force (browser and API)."""

    share: float
    weight: float
    total: int
    api: int = 0
    api_canary: int = 0
    # session -> [requests, canary requests, 1 if its first request under this weight was canary]
    sessions: dict[int, list[int]] = field(default_factory=dict)

    def add(self, *, session: int | None, canary: bool) -> None:
        if session is None:
            self.api += 1
            self.api_canary += canary
            return
        counts = self.sessions.get(session)
        if counts is None:
            counts = self.sessions[session] = [0, 0, int(canary)]
        counts[0] += 1
        counts[1] += canary

    @property
    def users(self) -> int:
        return self.api + len(self.sessions)

    @property
    def canary_users(self) -> int:
        return self.api_canary + sum(first for _, _, first in self.sessions.values())

    @property
    def browser_requests(self) -> int:
        return sum(n for n, _, _ in self.sessions.values())

    @property
    def requests(self) -> int:
        return self.api + self.browser_requests

    @property
    def canary_requests(self) -> int:
        return self.api_canary + sum(c for _, c, _ in self.sessions.values())

    def tolerance(self, delta: float) -> float:
        n = self.users
        return bernstein_tolerance(self.share, n=n, sum_sq=n, max_cluster=1, delta=delta)

    def judge(self, *, delta: float, min_users: int) -> dict[str, object]:
        n = self.users
        observed = self.canary_users / n if n else math.nan
        tolerance = self.tolerance(delta)
        judged = n >= min_users
        return {
            "weight": self.weight,
            "total": self.total,
            "expected": self.share,
            "observed": observed,
            "users": n,
            "api": self.api,
            "sessions": len(self.sessions),
            "requests": self.requests,
            "request_share": self.canary_requests / self.requests if self.requests else math.nan,
            "tolerance": tolerance,
            "judged": judged,
            "pass": (not judged) or abs(observed - self.share) <= tolerance,
        }


# -- flips -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Flip:
    session: int
    before: str
    after: str
    since: float  # the send time of the session's previous request
    at: float  # the receive time of the request that saw the other version


def judge_flip(flip: Flip, history: WeightHistory | None) -> str:
    """``allowed`` if a weight change in that direction could explain it, else ``violation``.
    Without a history (no admin URL) the weight is taken as constant: every flip violates."""
    if history is None:
        return "violation"
    needed = 1 if flip.after == CANARY else -1
    return "allowed" if needed in history.directions_between(flip.since, flip.at) else "violation"


def summarize_flips(flips: Iterable[Flip], history: WeightHistory | None) -> dict[str, object]:
    allowed_up = allowed_down = violations = 0
    violating_sessions: set[int] = set()
    examples: list[str] = []
    for flip in flips:
        if judge_flip(flip, history) == "allowed":
            if flip.after == CANARY:
                allowed_up += 1
            else:
                allowed_down += 1
        else:
            violations += 1
            violating_sessions.add(flip.session)
            if len(examples) < 5:
                examples.append(f"session {flip.session}: {flip.before} -> {flip.after}")
    return {
        "violations": violations,
        "violating_sessions": len(violating_sessions),
        "allowed_stable_to_canary": allowed_up,
        "allowed_canary_to_stable": allowed_down,
        "examples": examples,
        "pass": violations == 0,
    }
