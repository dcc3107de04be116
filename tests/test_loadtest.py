"""The Locust load test: its judge (pure, as tables) and a short run against the real proxy.

Locust itself only ever runs in its own process (``loadtests/run_local.py`` starts it):
importing it monkeypatches the standard library through gevent, which would break this
test process. ``canary_checks`` is the part of the load test that imports neither.
"""

from __future__ import annotations

import importlib.util
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from canary_proxy.config import BUCKETS, canary_buckets
from loadtests.canary_checks import (
    Flip,
    PhaseStats,
    Poll,
    WeightHistory,
    bernstein_tolerance,
    expected_share,
    judge_flip,
    summarize_flips,
)

ROOT = Path(__file__).resolve().parent.parent


def test_nothing_here_imports_locust_or_gevent() -> None:
    assert "locust" not in sys.modules
    assert "gevent" not in sys.modules


@pytest.mark.parametrize(
    ("weight", "total"),
    [(0, 100), (10, 100), (12.5, 100), (0.005, 100), (0.004, 100), (1, 3), (2, 3), (100, 100), (7, 1000)],
)
def test_expected_share_is_the_proxys_own_rounding(weight: float, total: int) -> None:
    assert expected_share(weight, total) == canary_buckets(weight, total) / BUCKETS


def test_the_share_bound_holds_and_is_not_loose() -> None:
    rng = random.Random(7)
    p, n, delta = 0.1, 2000, 0.05
    tolerance = bernstein_tolerance(p, n=n, sum_sq=n, max_cluster=1, delta=delta)
    misses = sum(abs(sum(rng.random() < p for _ in range(n)) / n - p) > tolerance for _ in range(400))
    assert misses <= 400 * delta  # Bernstein is conservative: in practice far fewer
    normal = 1.96 * (p * (1 - p) / n) ** 0.5
    assert normal < tolerance < 1.5 * normal


def test_a_sticky_session_counts_as_one_user_under_each_weight() -> None:
    phase = PhaseStats(share=0.5, weight=50, total=100)
    for _ in range(10):
        phase.add(session=1, canary=True)
    phase.add(session=None, canary=False)
    phase.add(session=None, canary=True)
    assert (phase.users, phase.canary_users) == (3, 2)
    assert (phase.requests, phase.canary_requests) == (12, 11)


def history(*polls: tuple[float, float, float]) -> WeightHistory:
    """Polls as (sent, received, weight) out of 100, no apply slack."""
    h = WeightHistory(apply_slack=0)
    for sent, received, weight in polls:
        h.record(Poll(sent, received, weight, 100))
    return h


# 10 until a poll sent at 2.0 (answered 2.1); 30 from a poll answered by 2.6.
RISE = history((0.0, 0.1, 10), (1.0, 1.1, 10), (2.0, 2.1, 10), (2.5, 2.6, 30), (3.0, 3.1, 30))


@pytest.mark.parametrize(
    ("t0", "t1", "weight"),
    [
        (0.5, 0.6, 10),
        (1.9, 2.0, 10),
        (1.9, 2.05, None),  # may have been routed after the change
        (2.55, 2.6, None),
        (2.6, 2.7, 30),
        (-1.0, -0.9, None),  # before the first poll
    ],
)
def test_requests_are_attributed_to_the_weight_in_force_or_to_none(
    t0: float, t1: float, weight: float | None
) -> None:
    poll = RISE.share_between(t0, t1)
    assert (poll.weight if poll else None) == weight


@pytest.mark.parametrize(
    ("before", "after", "since", "at", "verdict"),
    [
        ("stable", "canary", 1.9, 2.7, "allowed"),  # across the rise
        ("canary", "stable", 1.9, 2.7, "violation"),  # a rise never moves anyone back
        ("stable", "canary", 0.2, 0.4, "violation"),  # weight constant
        ("stable", "canary", 2.7, 2.9, "violation"),  # after the rise settled
    ],
)
def test_flips_are_judged_against_the_weight_history(
    before: str, after: str, since: float, at: float, verdict: str
) -> None:
    assert judge_flip(Flip(1, before, after, since, at), RISE) == verdict


def test_without_a_history_every_flip_is_a_violation() -> None:
    summary = summarize_flips([Flip(1, "stable", "canary", 0, 1), Flip(1, "canary", "stable", 1, 2)], None)
    assert (summary["violations"], summary["violating_sessions"], summary["pass"]) == (2, 1, False)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_short_load_run_with_a_weight_rise_passes_every_check() -> None:
    assert importlib.util.find_spec("locust") is not None, "locust is missing: install the test extra"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "loadtests" / "run_local.py"), "--duration", "20", "--weights", "10,30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = process.communicate(timeout=200)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # run_local stops its children on SIGTERM
            process.communicate(timeout=30)
    assert process.returncode == 0, out
    assert "run-local: PASS" in out
    assert "RESULT: PASS" in out
    assert re.search(r"PASS  errors: 0 of \d+ requests failed", out), out
    assert re.search(r"PASS  share: weight 10/100 .* observed [\d.]+% of \d+ users", out), out
    assert re.search(r"PASS  share: weight 30/100 .* observed [\d.]+% of \d+ users", out), out
    assert re.search(r"PASS  flips: 0 violations", out), out
    assert re.search(r"PASS  header misroutes: 0 of [1-9]\d* QA requests", out), out
    assert re.search(r"locust totals \(--json-file\): [1-9]\d* requests, 0 failures", out), out
