"""The routing decision as a table: pure, no sockets."""

from __future__ import annotations

from typing import Any

import pytest

from canary_proxy.config import parse_config
from canary_proxy.router import CANARY, STABLE, Decision, decide, mirrored, parse_bucket

BASE = {"stable-url": "http://s:1", "canary-url": "http://c:1"}
H = {"canary-by-header": "X-Canary"}


def cfg(**keys: Any) -> Any:
    return parse_config({**BASE, **{k.replace("_", "-"): v for k, v in keys.items()}})


# config, header value, cookie value, sticky cookie, drawn bucket -> version, rule
TABLE: list[tuple[dict[str, Any], str | None, str | None, str | None, int, str, str]] = [
    ({**H}, "always", None, None, 9999, CANARY, "header"),
    ({**H, "canary-weight": 100}, "never", None, None, 0, STABLE, "header"),
    ({**H, "canary-weight": 100}, "sometimes", None, None, 0, CANARY, "weight"),
    ({**H, "canary-by-header-value": "v"}, "v", None, None, 9999, CANARY, "header"),
    ({**H, "canary-by-header-value": "v"}, "always", None, None, 9999, STABLE, "weight"),
    ({**H, "canary-by-header-value": "v", "canary-weight": 100}, "never", None, None, 0, CANARY, "weight"),
    (
        {**H, "canary-by-header-value": "v", "canary-by-header-pattern": ".*"},
        "x",
        None,
        None,
        9999,
        STABLE,
        "weight",
    ),
    ({**H, "canary-by-header-pattern": "a+"}, "aaa", None, None, 9999, CANARY, "header"),
    ({**H, "canary-by-header-pattern": "a+"}, "aab", None, None, 9999, STABLE, "weight"),
    ({**H, "canary-by-header-pattern": "a+", "canary-weight": 100}, "never", None, None, 0, CANARY, "weight"),
    ({"canary-by-cookie": "c"}, None, "always", None, 9999, CANARY, "cookie"),
    ({"canary-by-cookie": "c", "canary-weight": 100}, None, "never", None, 0, STABLE, "cookie"),
    ({"canary-by-cookie": "c"}, None, "Always", None, 9999, STABLE, "weight"),
    ({**H, "canary-by-cookie": "c"}, "never", "always", None, 0, STABLE, "header"),
    ({**H, "canary-by-cookie": "c"}, "other", "always", None, 9999, CANARY, "cookie"),
    ({"canary-weight": 10}, None, None, "999", 0, CANARY, "sticky"),
    ({"canary-weight": 10}, None, None, "1000", 0, STABLE, "sticky"),
    ({"canary-weight": 10}, None, None, "junk", 999, CANARY, "weight"),
    ({"canary-weight": 10}, None, None, "10000", 1000, STABLE, "weight"),
    ({"canary-weight": 0.5}, None, None, "49", 0, CANARY, "sticky"),
    ({"canary-weight": 0.5}, None, None, "50", 0, STABLE, "sticky"),
    ({"canary-weight": 10, "sticky-cookie": ""}, None, None, "0", 5000, STABLE, "weight"),
]


@pytest.mark.parametrize(("keys", "header", "cookie", "sticky", "draw", "version", "rule"), TABLE)
def test_precedence(
    keys: dict[str, Any], header: str | None, cookie: str | None, sticky: str | None,
    draw: int, version: str, rule: str,
) -> None:  # fmt: skip
    decision = decide(cfg(**keys), header=header, cookie=cookie, sticky=sticky, draw=lambda: draw)
    assert (decision.version, decision.rule) == (version, rule)


def test_a_fresh_user_gets_a_cookie_whatever_rule_routed_them() -> None:
    config = cfg(**H)
    forced = decide(config, header="always", cookie=None, sticky=None, draw=lambda: 1234)
    assert forced.set_cookie and forced.bucket == 1234
    kept = decide(config, header="always", cookie=None, sticky="77", draw=lambda: 1234)
    assert not kept.set_cookie and kept.bucket == 77


def test_no_cookie_when_stickiness_is_off() -> None:
    decision = decide(cfg(sticky_cookie=""), header=None, cookie=None, sticky=None, draw=lambda: 3)
    assert not decision.set_cookie and decision.bucket is None


def test_rising_weight_only_moves_users_to_the_canary() -> None:
    weights = [0, 0.01, 0.5, 1, 5, 10, 25, 33.33, 50, 99.99, 100]
    for bucket in range(0, 10_000, 7):
        versions = [
            decide(cfg(canary_weight=w), header=None, cookie=None, sticky=str(bucket), draw=lambda: 0).version
            for w in weights
        ]
        first_canary = versions.index(CANARY) if CANARY in versions else len(versions)
        assert all(v == STABLE for v in versions[:first_canary])
        assert all(v == CANARY for v in versions[first_canary:])


@pytest.mark.parametrize(
    ("value", "bucket"),
    [("0", 0), ("9999", 9999), ("0042", 42), ("10000", None), ("-1", None), ("", None),
     ("4x", None), ("\uff11\uff12", None), (None, None)],
)  # fmt: skip
def test_only_plain_buckets_are_valid(value: str | None, bucket: int | None) -> None:
    assert parse_bucket(value) == bucket


# decision (version, rule), mirror percent, mirror draw -> mirrored
MIRROR_TABLE: list[tuple[str, str, float, int, bool]] = [
    (STABLE, "weight", 100, 9999, True),
    (STABLE, "sticky", 100, 9999, True),
    (STABLE, "weight", 10, 999, True),
    (STABLE, "weight", 10, 1000, False),
    (STABLE, "weight", 0.01, 0, True),
    (STABLE, "weight", 0, 0, False),
    (STABLE, "header", 100, 0, False),
    (STABLE, "cookie", 100, 0, False),
    (STABLE, "failover", 100, 0, False),
    (CANARY, "weight", 100, 0, False),
    (CANARY, "header", 100, 0, False),
]


@pytest.mark.parametrize(("version", "rule", "percent", "draw", "expected"), MIRROR_TABLE)
def test_only_requests_the_weight_sent_to_stable_are_mirrored(
    version: str, rule: str, percent: float, draw: int, expected: bool
) -> None:
    decision = Decision(version, rule, None, False)
    assert mirrored(cfg(canary_mirror_percent=percent), decision, lambda: draw) is expected
