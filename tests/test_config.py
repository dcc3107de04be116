"""The config parser: pure table tests, no I/O."""

from __future__ import annotations

from typing import Any

import pytest

from canary_proxy.config import BUCKETS, ConfigError, canary_buckets, parse_config
from canary_proxy.values import parse_duration

BASE = {"stable-url": "http://stable:8080", "canary-url": "https://canary.ns.svc:8443"}


def test_defaults_are_filled_in() -> None:
    effective = parse_config(BASE).effective()
    assert effective == {
        "stable-url": "http://stable:8080",
        "canary-url": "https://canary.ns.svc:8443",
        "canary-weight": 0,
        "canary-weight-total": 100,
        "canary-by-header": None,
        "canary-by-header-value": None,
        "canary-by-header-pattern": None,
        "canary-by-cookie": None,
        "sticky-cookie": "canary_proxy_bucket",
        "sticky-max-age": 86400,
        "upstream-connect-timeout": "2s",
        "upstream-timeout": "1m",
        "canary-failover": True,
        "canary-outlier-failures": 0,
        "canary-outlier-cooldown": "30s",
        "version-header": "X-Canary-Version",
        "upstream-ca": None,
        "canary-mirror-percent": 0,
        "canary-mirror-max-body": "64KiB",
        "canary-mirror-timeout": "10s",
        "canary-mirror-max-in-flight": 100,
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"canary-weight": "12.5"}, {"canary-weight": 12.5}),
        (
            {"canary-weight": 7, "canary-weight-total": 1000},
            {"canary-weight": 7, "canary-weight-total": 1000},
        ),
        ({"canary-weight-total": "1000.0", "canary-weight": "1000"}, {"canary-weight": 1000}),
        ({"canary-failover": "false"}, {"canary-failover": False}),
        ({"canary-failover": False}, {"canary-failover": False}),
        ({"upstream-timeout": "500ms"}, {"upstream-timeout": "500ms"}),
        ({"upstream-timeout": 3}, {"upstream-timeout": "3s"}),
        ({"upstream-timeout": "1.5s"}, {"upstream-timeout": "1500ms"}),
        ({"upstream-connect-timeout": "2m"}, {"upstream-connect-timeout": "2m"}),
        ({"sticky-cookie": ""}, {"sticky-cookie": ""}),
        ({"version-header": ""}, {"version-header": ""}),
        ({"canary-by-header": "X-Canary", "canary-by-header-value": 42}, {"canary-by-header-value": "42"}),
        ({"stable-url": "http://s:1/"}, {"stable-url": "http://s:1"}),
        ({"canary-mirror-percent": "12.5"}, {"canary-mirror-percent": 12.5}),
        ({"canary-mirror-percent": 100}, {"canary-mirror-percent": 100}),
        ({"canary-mirror-max-body": "1MiB"}, {"canary-mirror-max-body": "1MiB"}),
        ({"canary-mirror-max-body": 1000}, {"canary-mirror-max-body": "1000"}),
        ({"canary-mirror-timeout": "250ms"}, {"canary-mirror-timeout": "250ms"}),
    ],
)
def test_values_are_normalised(raw: dict[str, Any], expected: dict[str, Any]) -> None:
    effective = parse_config({**BASE, **raw}).effective()
    for key, value in expected.items():
        assert effective[key] == value


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        ({"canary-weight": 101}, "canary-weight", "from 0 to 100"),
        ({"canary-weight": -1}, "canary-weight", "from 0 to 100"),
        ({"canary-weight": "ten"}, "canary-weight", "a number"),
        ({"canary-weight": True}, "canary-weight", "a number"),
        ({"canary-weight": "nan"}, "canary-weight", "finite"),
        ({"canary-weight-total": 0}, "canary-weight-total", "whole number"),
        ({"canary-weight-total": 2.5}, "canary-weight-total", "whole number"),
        ({"canary-weight": 600, "canary-weight-total": 500}, "canary-weight", "from 0 to 500"),
        ({"stable-url": "ftp://x:1"}, "stable-url", "scheme http or https"),
        ({"stable-url": "http://x:1/path"}, "stable-url", "without path"),
        ({"stable-url": "http://user:pw@x:1"}, "stable-url", "credentials"),
        ({"canary-url": "http://x:99999"}, "canary-url", "URL"),
        ({"canary-url": ""}, "canary-url", "required"),
        ({"upstream-timeout": "5 parsecs"}, "upstream-timeout", "duration"),
        ({"upstream-timeout": "0s"}, "upstream-timeout", "greater than 0"),
        ({"canary-by-header-pattern": "("}, "canary-by-header-pattern", "regular expression"),
        ({"canary-by-header": "bad header"}, "canary-by-header", "header or cookie name"),
        ({"canary-failover": "maybe"}, "canary-failover", "true or false"),
        ({"sticky-max-age": -5}, "sticky-max-age", "whole number"),
        ({"canary-wieght": 5}, "canary-wieght", "unknown key"),
        ({"canary-weight": {"a": 1}}, "canary-weight", "a number"),
        ({"canary-mirror-percent": 101}, "canary-mirror-percent", "from 0 to 100"),
        ({"canary-mirror-percent": -0.5}, "canary-mirror-percent", "from 0 to 100"),
        ({"canary-mirror-percent": "all"}, "canary-mirror-percent", "a number"),
        ({"canary-mirror-max-body": "64KB"}, "canary-mirror-max-body", "a size such as"),
        ({"canary-mirror-timeout": "0"}, "canary-mirror-timeout", "greater than 0"),
        ({"canary-mirror-max-in-flight": 0}, "canary-mirror-max-in-flight", "whole number >= 1"),
    ],
)
def test_errors_name_the_key_the_value_and_what_was_expected(
    raw: dict[str, Any], key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, **raw})
    matching = [e for e in info.value.errors if e.startswith(f"{key}:")]
    assert matching, info.value.errors
    assert fragment in matching[0]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("canary-wieght", "canary-wieght: unknown key; did you mean canary-weight?"),
        ("canary_by_header", "canary_by_header: unknown key; did you mean canary-by-header?"),
        ("stable", "stable: unknown key; did you mean stable-url?"),
        ("upstream-timout", "upstream-timout: unknown key; did you mean upstream-timeout?"),
    ],
)
def test_a_mistyped_key_names_the_closest_key(key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, key: 1})
    assert info.value.errors == [message]


def test_an_unknown_key_like_no_other_lists_them_all() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "bogus": 1})
    [error] = info.value.errors
    assert error.startswith("bogus: unknown key; expected one of stable-url, canary-url, canary-weight,")
    assert error.endswith("canary-mirror-max-in-flight")


def test_every_error_is_listed_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"canary-weight": "x", "bogus": 1, "upstream-timeout": "soon"})
    keys = sorted(e.split(":")[0] for e in info.value.errors)
    assert keys == ["bogus", "canary-url", "canary-weight", "stable-url", "upstream-timeout"]


def test_effective_config_parses_back_to_the_same_config() -> None:
    config = parse_config(
        {**BASE, "canary-weight": 0.25, "canary-by-header": "X-Qa", "canary-by-header-pattern": "a|b",
         "canary-mirror-percent": 2.5, "canary-mirror-max-body": "3KiB"}
    )  # fmt: skip
    assert parse_config(config.effective()) == config
    assert config.mirror_buckets == 250


@pytest.mark.parametrize(
    ("weight", "total", "buckets"),
    [(0, 100, 0), (100, 100, BUCKETS), (10, 100, 1000), (0.5, 100, 50), (0.01, 100, 1),
     (0.004, 100, 0), (0.005, 100, 1), (1, 3, 3333), (2, 3, 6667), (33, 1000, 330)],
)  # fmt: skip
def test_weight_maps_to_buckets_precise_to_a_hundredth_of_a_percent(
    weight: float, total: int, buckets: int
) -> None:
    assert canary_buckets(weight, total) == buckets


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("2s", 2.0), ("1m", 60.0), ("1h", 3600.0), ("3", 3.0), (1.5, 1.5)],
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds
