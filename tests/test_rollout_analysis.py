"""One analysis check (pure): pass, fail, inconclusive; absolute and relative limits."""

from __future__ import annotations

import math

import pytest

from canary_proxy.rollout.analysis import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    Thresholds,
    VersionStats,
    Window,
    histogram_quantile,
    parse_factor,
    parse_percent,
    verdict,
)

T = Thresholds(min_requests=100)  # 1 % max, 500 ms max, +0.5 pp, 2x
OK_STABLE = VersionStats(1000, 0, 0.100)


def w(canary: tuple[float, float, float | None], stable: VersionStats = OK_STABLE) -> Window:
    return Window(stable=stable, canary=VersionStats(*canary))


@pytest.mark.parametrize(
    ("window", "relative", "result", "reason"),
    [
        # healthy
        (w((200, 1, 0.120)), True, PASS, ""),
        (w((100, 0, 0.199)), True, PASS, ""),  # exactly min-requests is enough
        # too little canary data: wait, never fail, never pass
        (w((99, 99, 9.0)), True, INCONCLUSIVE, "fewer than --min-requests 100"),
        (w((0, 0, None)), True, INCONCLUSIVE, "fewer than --min-requests"),
        (w((500, 0, None)), True, INCONCLUSIVE, "no canary latency"),
        # absolute limits
        (w((200, 4, 0.1)), True, FAIL, "error rate 2.00% > max 1.00%"),
        (w((200, 0, 0.6)), True, FAIL, "p99 600.0ms > max 500.0ms"),
        # relative limits: 0.8 % is under the 1 % max but 0.8 pp above stable's 0 %
        (w((1000, 8, 0.1)), True, FAIL, "error rate 0.80% > stable 0.00% + 0.5pp = 0.50%"),
        (w((1000, 8, 0.1), VersionStats(1000, 5, 0.1)), True, PASS, ""),  # stable 0.5 % + 0.5 pp
        (w((200, 0, 0.250)), True, FAIL, "p99 250.0ms > stable 100.0ms x 2 = 200.0ms"),
        # at 100 % only the absolute limits apply
        (w((1000, 8, 0.250), VersionStats(0, 0, None)), False, PASS, ""),
        (w((1000, 8, 0.250)), False, PASS, ""),
        (w((1000, 20, 0.250)), False, FAIL, "error rate 2.00% > max 1.00%"),
        # a thin stable baseline is noise: relative limits are skipped, absolute ones apply
        (w((1000, 8, 0.25), VersionStats(10, 0, 0.01)), True, PASS, ""),
    ],
)
def test_verdicts(window: Window, relative: bool, result: str, reason: str) -> None:
    v = verdict(window, T, relative=relative)
    assert v.result == result, v
    assert reason in " | ".join(v.reasons)
    if result == FAIL:
        assert v.reasons and all(not c.ok for c in v.checks if c.text in v.reasons)


def test_the_summary_has_every_number_and_limit() -> None:
    v = verdict(w((200, 50, 0.049), VersionStats(800, 0, 0.048)), T, relative=True)
    line = v.summary()
    assert line.startswith("canary 200 req, 50 5xx (25.00%), p99 49.0ms; stable 800 req, 0 5xx (0.00%)")
    assert "error rate 25.00% > max 1.00% FAIL" in line
    assert "p99 49.0ms <= max 500.0ms ok" in line
    assert "p99 49.0ms <= stable 48.0ms x 2 = 96.0ms ok" in line
    numbers = v.as_dict()
    assert numbers["canary"] == {"requests": 200, "errors": 50, "errorRate": 0.25, "p99": 0.049}
    assert [c["name"] for c in numbers["checks"]] == [
        "error-rate",
        "p99",
        "error-rate-vs-stable",
        "p99-vs-stable",
    ]


@pytest.mark.parametrize(
    ("text", "value"), [("1%", 0.01), ("1", 0.01), ("0.5", 0.005), ("0.5pp", 0.005), ("0", 0.0)]
)
def test_percent(text: str, value: float) -> None:
    assert parse_percent(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "x", "-1%", "101%", "1 %%"])
def test_bad_percent(text: str) -> None:
    with pytest.raises(ValueError):
        parse_percent(text)


@pytest.mark.parametrize(("text", "value"), [("2x", 2.0), ("1.5", 1.5), ("1x", 1.0)])
def test_factor(text: str, value: float) -> None:
    assert parse_factor(text) == value


@pytest.mark.parametrize("text", ["0.5x", "x", "two"])
def test_bad_factor(text: str) -> None:
    with pytest.raises(ValueError):
        parse_factor(text)


INF = math.inf


@pytest.mark.parametrize(
    ("buckets", "expected"),
    [
        ([], None),
        ([(0.1, 0), (INF, 0)], None),
        ([(0.1, 100), (INF, 100)], 0.099),  # all in the first bucket: interpolate from 0
        ([(0.05, 0), (0.1, 100), (INF, 100)], 0.0995),
        ([(0.05, 50), (0.1, 100), (INF, 100)], 0.099),
        ([(0.1, 0), (0.5, 0), (INF, 10)], 0.5),  # in +Inf: the highest finite bound
        ([(0.1, 100), (0.05, 100), (INF, 100)], 0.0495),  # order does not matter
        ([(0.05, 60), (0.1, 50), (INF, 100)], 0.1),  # non-monotonic counts are clamped
    ],
)
def test_histogram_quantile(buckets: list[tuple[float, float]], expected: float | None) -> None:
    got = histogram_quantile(0.99, buckets)
    assert got == (None if expected is None else pytest.approx(expected))
