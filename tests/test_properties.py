"""Property tests (hypothesis) of the pure core: the config parser and the routing decision."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canary_proxy.config import BUCKETS, KEYS, Config, ConfigError, parse_config
from canary_proxy.router import CANARY, RULES, STABLE, decide

PROPERTIES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=20)
hosts = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
)
urls = st.builds(
    lambda scheme, host, port, slash: f"{scheme}://{host}{'' if port is None else f':{port}'}{slash}",
    st.sampled_from(["http", "https"]),
    hosts,
    st.none() | st.integers(1, 65535),
    st.sampled_from(["", "/"]),
)
durations = st.one_of(
    st.integers(1, 10**6).map(lambda ms: f"{ms}ms"),
    st.integers(1, 10**5).map(lambda s: f"{s}s"),
    st.integers(1, 10**4).map(lambda m: f"{m}m"),
    st.integers(1, 24).map(lambda h: f"{h}h"),
    st.floats(0.001, 10**6, allow_nan=False),  # a plain number is seconds
    st.integers(1, 10**6),
)
booleans = st.one_of(st.booleans(), st.sampled_from(["true", "false", "yes", "no", "on", "off", "1", "0"]))
texts = st.text(max_size=30)
patterns = st.one_of(st.sampled_from(["a|b", "v[0-9]+", ".*", "beta-.+"]), texts.map(re.escape))


@st.composite
def raw_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Any valid raw config: the required URLs and any subset of the optional keys."""
    total = draw(st.integers(1, 10**6))
    weight = draw(st.one_of(st.integers(0, total), st.floats(0, total, allow_nan=False)))
    optional: dict[str, st.SearchStrategy[Any]] = {
        "canary-weight": st.one_of(st.just(weight), st.just(str(weight))),
        "canary-by-header": tokens,
        "canary-by-header-value": st.one_of(texts, st.integers()),
        "canary-by-header-pattern": patterns,
        "canary-by-cookie": tokens,
        "sticky-cookie": st.one_of(tokens, st.just("")),
        "sticky-max-age": st.integers(0, 10**9),
        "upstream-connect-timeout": durations,
        "upstream-timeout": durations,
        "canary-failover": booleans,
        "canary-outlier-failures": st.integers(0, 1000),
        "canary-outlier-cooldown": durations,
        "version-header": st.one_of(tokens, st.just("")),
        "upstream-ca": st.one_of(st.none(), st.just("/etc/ssl/upstream/ca.pem")),
    }
    raw: dict[str, Any] = {"stable-url": draw(urls), "canary-url": draw(urls), "canary-weight-total": total}
    for key in draw(st.sets(st.sampled_from(sorted(optional)))):
        raw[key] = draw(optional[key])
    return raw


@PROPERTIES
@given(raw_configs())
def test_any_valid_config_round_trips_through_its_effective_form(raw: dict[str, Any]) -> None:
    config = parse_config(raw)
    effective = config.effective()
    assert set(effective) == set(KEYS)
    again = parse_config(effective)
    assert again == config
    assert again.effective() == effective
    assert again.canary_buckets == config.canary_buckets


# For each key, values that are never valid for it.
INVALID: dict[str, st.SearchStrategy[Any]] = {
    "stable-url": st.one_of(
        st.sampled_from(
            ["ftp://x:1", "http://", "http://x:1/path", "http://u:p@x", "x:80", "http://x:99999"]
        ),
        st.integers(),
        st.booleans(),
    ),
    "canary-weight": st.one_of(
        st.sampled_from(["ten", "nan", "inf", "-inf", ""]),
        st.booleans(),
        st.floats(max_value=-1e-9),
        st.integers(min_value=101),
        st.lists(st.integers(), max_size=2),
    ),
    "canary-weight-total": st.one_of(
        st.integers(max_value=0), st.floats(0.01, 0.99), st.sampled_from(["x", "1.5", "nan"])
    ),
    "canary-by-header": st.text(min_size=1).filter(
        lambda t: t.strip() != "" and re.fullmatch(f"[{re.escape(TOKEN_CHARS)}]+", t.strip()) is None
    ),
    "canary-by-header-pattern": st.sampled_from(
        ["(", "[a-", "*", "a{2,1}", "(?P<x", "a{4294967296}", "(" * 1000 + ")" * 1000]
    ),
    "sticky-max-age": st.one_of(st.integers(max_value=-1), st.floats(0.1, 0.9), st.just("soon")),
    "upstream-timeout": st.one_of(
        st.sampled_from(["0", "0s", "-1s", "5 parsecs", "1e3", "nan", "1d", "0.0001s"]),
        st.integers(max_value=0),
        st.integers(min_value=366 * 86400 + 1),
        st.booleans(),
    ),
    "canary-failover": st.text().filter(
        lambda t: t.strip().lower() not in {"true", "false", "yes", "no", "on", "off", "1", "0"}
    ),
    "upstream-ca": st.one_of(st.integers(), st.booleans(), st.lists(st.text(), max_size=1)),
    "canary-outlier-failures": st.one_of(st.integers(max_value=-1), st.floats(0.1, 0.9), st.just("many")),
}


@PROPERTIES
@given(st.data())
def test_an_invalid_value_is_a_config_error_naming_its_key(data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(INVALID)))
    value = data.draw(INVALID[key])
    raw = {"stable-url": "http://s:1", "canary-url": "http://c:1", key: value}
    try:
        parse_config(raw)
    except ConfigError as exc:
        assert any(line.startswith(f"{key}:") for line in exc.errors), exc.errors
    else:
        raise AssertionError(f"{key}={value!r} was accepted")


ANY_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text()),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)


@PROPERTIES
@given(st.dictionaries(st.sampled_from([*KEYS, "bogus"]), ANY_VALUE))
def test_the_parser_never_fails_with_anything_but_a_config_error(raw: dict[str, Any]) -> None:
    try:
        config = parse_config(raw)
    except ConfigError as exc:
        assert exc.errors and all(":" in line for line in exc.errors)
    else:
        assert isinstance(config, Config)


def test_huge_numbers_are_config_errors_not_crashes() -> None:
    huge = 10**5000  # YAML can hold it; float() overflows and repr() refuses it
    for key in ("canary-weight", "canary-weight-total", "sticky-max-age", "upstream-timeout"):
        try:
            parse_config({"stable-url": "http://s:1", "canary-url": "http://c:1", key: huge})
        except ConfigError as exc:
            assert exc.errors[0].startswith(f"{key}:")
        else:
            raise AssertionError(key)


# -- the router -------------------------------------------------------------------------------

optional_text = (
    st.none() | st.text(max_size=12) | st.sampled_from(["always", "never", "1234", "9999", "10000"])
)
buckets = st.integers(0, BUCKETS - 1)


def _request(draw: st.DrawFn) -> dict[str, Any]:
    return {"header": draw(optional_text), "cookie": draw(optional_text), "sticky": draw(optional_text)}


@PROPERTIES
@given(raw_configs(), st.data())
def test_decide_is_total_and_deterministic_for_a_given_bucket(
    raw: dict[str, Any], data: st.DataObject
) -> None:
    config = parse_config(raw)
    request = _request(data.draw)
    bucket = data.draw(buckets)
    first = decide(config, **request, draw=lambda: bucket)
    assert first.version in (STABLE, CANARY)
    assert first.rule in RULES
    assert first.bucket is None or 0 <= first.bucket < BUCKETS
    assert decide(config, **request, draw=lambda: bucket) == first
    if first.rule in ("weight", "sticky"):
        assert (first.version == CANARY) == (
            (first.bucket if first.bucket is not None else bucket) < config.canary_buckets
        )


@PROPERTIES
@given(
    st.integers(1, 10**6),
    st.floats(0, 1),
    st.floats(0, 1),
    buckets,
    st.none() | st.integers(0, BUCKETS - 1).map(str),
)
def test_raising_the_weight_only_moves_users_to_the_canary(
    total: int, low: float, high: float, bucket: int, sticky: str | None
) -> None:
    low, high = sorted((low, high))
    versions = []
    for share in (low, high):
        config = parse_config(
            {"stable-url": "http://s:1", "canary-url": "http://c:1", "canary-weight-total": total,
             "canary-weight": share * total}
        )  # fmt: skip
        versions.append(decide(config, header=None, cookie=None, sticky=sticky, draw=lambda: bucket).version)
    assert versions != [CANARY, STABLE]
