"""Routes by host and path (``routes.py``), as tables of cases: pure, no sockets."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canary_proxy.config import ConfigError
from canary_proxy.routes import (
    Route,
    RouteTable,
    parse_documents,
    parse_route,
    request_host,
    request_path,
    settle_names,
)

UPSTREAMS = {"stable-url": "http://127.0.0.1:1", "canary-url": "http://127.0.0.1:2"}


def route(name: str, host: str = "", path: str = "/", path_type: str = "prefix", order: int = 0) -> Route:
    raw: dict[str, Any] = {**UPSTREAMS, "host": host, "path": path, "path-type": path_type}
    return parse_route(raw, name=name, order=(order,))


def table(*routes: Route) -> RouteTable[str]:
    return RouteTable((r, r.name) for r in routes)


def pick(t: RouteTable[str], host: str, target: str) -> str | None:
    found = t.lookup(request_host(host.encode()), request_path(target.encode()))
    return None if found is None else found[1]


ROUTES = table(
    route("any-root"),
    route("any-api", path="/api"),
    route("shop-root", host="shop.example.com"),
    route("shop-api", host="shop.example.com", path="/api/"),  # trailing / ignored for prefix
    route("shop-api-exact", host="shop.example.com", path="/api", path_type="exact"),
    route("wild-v2", host="*.example.com", path="/v2"),
    route("wild-root", host="*.example.com"),
    route("only-exact", host="exact.example.com", path="/health", path_type="exact"),
)


@pytest.mark.parametrize(
    ("host", "target", "expected"),
    [
        ("shop.example.com", "/", "shop-root"),
        ("SHOP.example.com:8080", "/api/x?q=1", "shop-api"),  # port and case do not matter
        ("shop.example.com", "/api", "shop-api-exact"),  # exact beats prefix at the same path
        ("shop.example.com", "/apix", "shop-root"),  # prefixes match whole segments
        ("shop.example.com", "/v2/a", "shop-root"),  # the exact host beats the wildcard
        ("other.example.com", "/v2/a", "wild-v2"),
        ("other.example.com", "/api/x", "wild-root"),  # a wildcard beats any host, path aside
        ("a.b.example.com", "/api/x", "any-api"),  # a wildcard covers exactly one label
        ("example.com", "/", "any-root"),
        ("", "/api", "any-api"),
        ("exact.example.com", "/health", "only-exact"),
        ("exact.example.com", "/other", "wild-root"),  # falls through to the wildcard
        ("[::1]:8080", "/", "any-root"),
    ],
)
def test_which_route_wins(host: str, target: str, expected: str) -> None:
    assert pick(ROUTES, host, target) == expected


def test_no_route_is_none() -> None:
    t = table(route("api", host="shop.example.com", path="/api"))
    assert pick(t, "shop.example.com", "/") is None
    assert pick(t, "other", "/api") is None


def test_a_lone_catch_all_route_takes_everything() -> None:
    t = table(route("default"))
    assert pick(t, "anything", "/whatever?x") == "default"
    assert t.conflicts == ()


def test_the_earlier_of_two_conflicting_routes_wins_and_the_other_is_reported() -> None:
    t = table(route("late", host="a.example", order=2), route("early", host="a.example", order=1))
    assert pick(t, "a.example", "/") == "early"
    assert [c.message() for c in t.conflicts] == [
        "route late conflicts with early on host a.example path / (prefix); early wins"
    ]
    assert [r.name for r in t.routes] == ["early"]


def test_same_path_different_type_is_no_conflict() -> None:
    t = table(route("p", path="/x"), route("e", path="/x", path_type="exact"))
    assert t.conflicts == () and pick(t, "", "/x") == "e" and pick(t, "", "/x/y") == "p"


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"host": "a b"}, "host: invalid value 'a b'"),
        ({"host": "*.com."}, "a wildcard needs a domain"),
        ({"host": "a.*.com"}, "host: invalid value"),
        ({"path": "api"}, "path: invalid value 'api'; expected a path starting with /"),
        ({"path-type": "regex"}, "path-type: invalid value 'regex'; expected prefix or exact"),
        ({"name": ""}, None),  # empty: the default name is used
        ({"canary-weight": 200}, "canary-weight: invalid value 200"),
    ],
)
def test_bad_route_keys_are_named(raw: dict[str, Any], error: str | None) -> None:
    if error is None:
        assert parse_route({**UPSTREAMS, **raw}, name="file.yaml").name == "file.yaml"
        return
    with pytest.raises(ConfigError) as caught:
        parse_route({**UPSTREAMS, **raw}, name="r")
    assert any(error in line for line in caught.value.errors), caught.value.errors


def test_a_route_may_name_itself() -> None:
    assert parse_route({**UPSTREAMS, "name": "shop"}, name="file.yaml#2").name == "shop"


def test_explain_lists_the_candidates_until_the_match() -> None:
    lines = ROUTES.explain(b"shop.example.com", b"/apix")
    assert lines[-1].startswith("shop-root") and lines[-1].endswith("matches")
    assert all(line.endswith("does not match") for line in lines[:-1])


def test_documents_are_named_by_file_and_number_unless_they_name_themselves() -> None:
    routes, rejected = parse_documents(
        "shop.yaml",
        [{**UPSTREAMS, "host": "a.example"}, None, {**UPSTREAMS, "name": "b", "host": "b.example"},
         {**UPSTREAMS, "host": "bad host"}],
    )  # fmt: skip
    assert [r.name for r in routes] == ["shop.yaml#1", "b"]
    assert [(r.name, len(r.errors)) for r in rejected] == [("shop.yaml#3", 1)]
    alone, _ = parse_documents("one.yaml", [{**UPSTREAMS, "host": "a.example"}])
    assert [r.name for r in alone] == ["one.yaml"]


def test_a_lone_unnamed_catch_all_route_is_default() -> None:
    routes, _ = parse_documents("canary.yaml", [dict(UPSTREAMS)])
    assert [r.name for r in settle_names(routes)] == ["default"]
    named, _ = parse_documents("canary.yaml", [{**UPSTREAMS, "name": "shop"}])
    assert [r.name for r in settle_names(named)] == ["shop"]
    two = [route("a", host="a.example"), route("b")]
    assert [r.name for r in settle_names(two)] == ["a", "b"]


def test_the_labels_the_proxy_uses_itself_are_no_route_names() -> None:
    for name in ("none", "default-backend"):
        with pytest.raises(ConfigError, match="reserved"):
            parse_route({**UPSTREAMS, "name": name}, name="file.yaml")


HOSTS = ["", "a.ex", "b.ex", "*.ex", "x.a.ex", "*.a.ex"]
PATHS = ["/", "/a", "/a/", "/ab", "/a/b", "/a/b/", "/a/b/c", "/b"]
# Tables of up to 12 routes: (host, path, path type) each.
SPECS = st.lists(
    st.tuples(st.sampled_from(HOSTS), st.sampled_from(PATHS), st.sampled_from(["prefix", "exact"])),
    max_size=12,
)
REQUEST_HOSTS = ["", "a.ex", "b.ex", "c.ex", "x.a.ex", "y.a.ex", "*.ex", "ex", "a.ex/a", ".ex"]
REQUEST_PATHS = ["/", "//", "/a", "/a/", "/a//", "/ab", "/a/b", "/a/bc", "/a/b/c/d", "/b/a", "/c", "/a/b/"]


@settings(max_examples=400, deadline=None)
@given(
    SPECS,
    st.sampled_from(REQUEST_HOSTS),
    st.sampled_from(REQUEST_PATHS),
)
def test_lookup_agrees_with_the_rules_written_out(
    specs: list[tuple[str, str, str]], host: str, path: str
) -> None:
    """``lookup`` probes keys; ``explain`` walks the candidates in precedence order, the rules
    as the module states them. Both must pick the same route for every table and request,
    trailing slashes (an Ingress's prefix path keeps its own) and wildcards included."""
    config = route("x").config
    routes = [Route(f"r{k}", h, p, t, config, (k,)) for k, (h, p, t) in enumerate(specs)]
    t = table(*routes)
    wanted = host.encode(), path.encode()
    expected = next((e.found for e in t.candidates(wanted[0]) if e.matches(wanted[1])), None)
    assert t.lookup(*wanted) == expected


RAW_HOSTS = [
    None,
    b"",
    b"a.ex",
    b"A.Ex:8080",
    b"x.a.ex:1",
    b"[::1]:8080",
    b"[::1]",
    b"c.ex:",
    b"*.ex",
    b"B.EX",
]
TARGETS = [b"/", b"/a", b"/a?x=1", b"/a/b?", b"?q", b"/a#frag", b"/a/b/c?x#y", b"", b"*", b"/A/b"]


@settings(max_examples=300, deadline=None)
@given(
    SPECS,
    st.sampled_from(RAW_HOSTS),
    st.sampled_from(TARGETS),
)
def test_the_data_paths_lookup_agrees_with_lookup(
    specs: list[tuple[str, str, str]], host: bytes | None, target: bytes
) -> None:
    """``value_for`` (the data path's: raw Host and target, request_host's and request_path's
    rules inlined) finds the value of the route ``lookup`` finds."""
    config = route("x").config
    t = table(*[Route(f"r{k}", h, p, kind, config, (k,)) for k, (h, p, kind) in enumerate(specs)])
    found = t.lookup(request_host(host), request_path(target))
    assert t.value_for(host, target) == (found[1] if found is not None else None)
