"""Ingress objects -> routes (``ingress.py``): the controllers' writes replayed, then tables of cases."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from canary_proxy.ingress import IngressRoute, IngressRoutes, RouteMemo, routes_from_ingresses
from canary_proxy.ingress_annotations import parse_nginx_size
from canary_proxy.routes import RouteTable

FIXTURES = Path(__file__).parent / "fixtures" / "ingress"
P = "nginx.ingress.kubernetes.io/"


# -- replaying what Argo Rollouts and Flagger write ------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies ``application/merge-patch+json``."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def replay(name: str) -> Iterator[tuple[str, IngressRoutes]]:
    """Each step's note and the routes the Ingresses in the store make after it."""
    fixture = json.loads((FIXTURES / name).read_text())
    store: dict[tuple[str, str], dict[str, Any]] = {}
    for step in fixture["steps"]:
        if step["verb"] in ("create", "update"):
            meta = step["object"]["metadata"]
            key = (meta["namespace"], meta["name"])
            assert (key in store) == (step["verb"] == "update"), step["note"]
            store[key] = copy.deepcopy(step["object"])
        elif step["verb"] == "patch":
            key = (step["namespace"], step["name"])
            store[key] = merge_patch(store[key], step["patch"])
        else:
            assert step["verb"] == "delete"
            del store[(step["namespace"], step["name"])]
        yield step["note"], routes_from_ingresses(list(store.values()), fixture["services"])


def only(result: IngressRoutes) -> IngressRoute:
    [route] = result.routes
    return route


def test_argo_rollouts_canary_ingress_weight_steps_then_deletion() -> None:
    # stable Ingress; Create at 0; merge patches 5, 25, 50, 100; 0 once promoted; deleted
    expected_weights: list[float | None] = [None, 0, 5, 25, 50, 100, 0, None]
    steps = list(replay("argo-rollouts.json"))
    assert len(steps) == len(expected_weights)
    for (note, result), weight in zip(steps, expected_weights, strict=True):
        assert result.reported == () and result.ignored == (), note
        route = only(result)
        assert route.route.name == "rollouts/rollouts-demo-stable"
        assert (route.route.host, route.route.path, route.route.path_type) == (
            "rollouts-demo.local",
            "/",
            "prefix",
        )
        assert (route.namespace, route.ingress, route.service) == (
            "rollouts",
            "rollouts-demo-stable",
            "rollouts-demo-stable",
        )
        config = route.route.config
        assert config.stable.url == "http://10.96.10.1:80"
        assert config.upstream_timeout == 30.0, "the stable Ingress's proxy-read-timeout is carried"
        assert config.canary_by_header is None and config.canary_by_cookie is None
        if weight is None:
            assert route.canary is None and route.canary_label == "", note
            assert config.canary_weight == 0 and config.canary.url == config.stable.url
        else:
            assert route.canary_ingress == "rollouts-demo-rollouts-demo-stable-canary", note
            assert route.canary_service == "rollouts-demo-canary"
            assert route.canary_label == "rollouts-rollouts-demo-canary-80"
            assert config.canary.url == "http://10.96.10.2:80"
            assert config.canary_weight == weight, note


def test_flagger_ab_test_then_weight_steps() -> None:
    steps = list(replay("flagger.json"))
    # stable; canary: "false" copy; A/B on; off; 10..50; off
    assert len(steps) == 10
    for note, result in steps:
        route = only(result)
        assert (route.route.name, route.ingress, route.service) == ("test/podinfo", "podinfo", "podinfo")
        assert route.route.host == "app.example.com"
        assert route.route.config.stable.url == "http://10.96.20.1:80"
        assert result.ignored == (), note
    # Flagger's switched-off canary (canary: "false") is a second main Ingress for the same
    # host and path: the younger one loses, reported, as ingress-nginx skips it.
    for index in (1, 3, 9):
        note, result = steps[index]
        assert only(result).canary is None, note
        [report] = result.reported
        assert report.kind == "conflict" and report.ingress == "test/podinfo-canary", note
        assert "test/podinfo is older and wins" in report.message
    assert steps[0][1].reported == ()

    _, ab = steps[2]
    assert ab.reported == ()
    route = only(ab)
    config = route.route.config
    assert route.canary_ingress == "podinfo-canary" and route.canary_service == "podinfo-canary"
    assert route.canary_label == "test-podinfo-canary-80"
    assert config.canary.url == "http://10.96.20.3:80"
    assert (config.canary_by_header, config.canary_by_header_value) == ("x-canary", "insider")
    assert config.canary_by_cookie == "canary"
    assert config.canary_weight == 0, "A/B: only the header and the cookie reach the canary"

    for (note, result), weight in zip(steps[4:9], (10, 20, 30, 40, 50), strict=True):
        assert result.reported == (), note
        config = only(result).route.config
        assert config.canary_weight == weight and config.canary.url == "http://10.96.20.3:80", note
        assert config.canary_by_header is None and config.canary_by_cookie is None, note


# -- tables of cases ---------------------------------------------------------------------------


def service(
    name: str, ports: dict[str, int], *, ip: str = "10.0.0.1", namespace: str = "shop", **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterIP": ip, "ports": [{"name": n, "port": p} for n, p in ports.items()], **spec},
    }


def backend(name: str, port: int | str) -> dict[str, Any]:
    return {"service": {"name": name, "port": {"number" if isinstance(port, int) else "name": port}}}


def ingress(
    name: str,
    svc: str = "web",
    port: int | str = 80,
    *,
    paths: list[tuple[str, str]] | None = None,
    host: str = "shop.example.com",
    annotations: dict[str, str] | None = None,
    created: str = "2026-01-01T00:00:00Z",
    namespace: str = "shop",
    ingress_class: str | None = "canary-proxy",
    default: dict[str, Any] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if ingress_class is not None:
        spec["ingressClassName"] = ingress_class
    if paths is None:
        paths = [("/", "Prefix")]
    if paths:
        http = {"paths": [{"path": p, "pathType": t, "backend": backend(svc, port)} for p, t in paths]}
        spec["rules"] = [{"host": host, "http": http}]
    if default is not None:
        spec["defaultBackend"] = default
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "creationTimestamp": created,
            "annotations": {P + k: v for k, v in (annotations or {}).items()},
        },
        "spec": spec,
    }


def canary(
    name: str, svc: str, port: int | str = 80, *, created: str = "2026-01-02T00:00:00Z", **rules: str
) -> dict[str, Any]:
    annotations = {"canary": "true", **{k.replace("_", "-"): v for k, v in rules.items()}}
    return ingress(name, svc, port, annotations=annotations, created=created)


SERVICES = [service("web", {"http": 80}), service("web-canary", {"http": 80}, ip="10.0.0.2")]


def test_paths_exact_and_implementation_specific_become_routes_named_by_position() -> None:
    paths = [("/", "Prefix"), ("/api/", "ImplementationSpecific"), ("/healthz", "Exact")]
    result = routes_from_ingresses([ingress("shop", paths=paths)], SERVICES)
    assert result.reported == ()
    shown = [(r.route.name, r.route.path, r.route.path_type, r.path) for r in result.routes]
    assert shown == [
        ("shop/shop#1", "/", "prefix", "/"),
        ("shop/shop#2", "/api", "prefix", "/api/"),  # ImplementationSpecific is Prefix
        ("shop/shop#3", "/healthz", "exact", "/healthz"),
    ]


def test_named_ports_resolve_through_the_service_and_label_as_ingress_nginx_does() -> None:
    services = [
        service("web", {"metrics": 9100, "http": 8080}),
        service("web-canary", {"http": 8081}, ip="10.0.0.2"),
    ]
    result = routes_from_ingresses(
        [ingress("shop", port="http"), canary("c", "web-canary", "http", canary_weight="10")], services
    )
    route = only(result)
    assert route.route.config.stable.url == "http://10.0.0.1:8080"
    assert route.route.config.canary.url == "http://10.0.0.2:8081"
    assert route.canary_label == "shop-web-canary-http"  # upstreamName keeps the port's name


def test_headless_ipv6_and_external_name_services() -> None:
    cases = {
        "None": "http://web.shop.svc.cluster.local:80",
        "fd00::1": "http://[fd00::1]:80",
    }
    for ip, url in cases.items():
        result = routes_from_ingresses([ingress("shop")], [service("web", {"http": 80}, ip=ip)])
        assert only(result).route.config.stable.url == url
    external = service("web", {}, ip="", type="ExternalName", externalName="web.example.net")
    assert (
        only(routes_from_ingresses([ingress("shop")], [external])).route.config.stable.url
        == "http://web.example.net:80"
    )


def test_default_backend_is_the_catch_all_and_takes_a_canary() -> None:
    main = ingress("shop", paths=[], default=backend("web", 80))
    can = ingress("shop-canary", paths=[], default=backend("web-canary", 80), created="2026-01-02T00:00:00Z",
                  annotations={"canary": "true", "canary-weight": "20"})  # fmt: skip
    route = only(routes_from_ingresses([main, can], SERVICES))
    assert route.route.catch_all and route.route.name == "shop/shop"
    assert route.route.config.canary_weight == 20 and route.canary_service == "web-canary"
    both = routes_from_ingresses([ingress("shop", default=backend("web", 80))], SERVICES)
    assert [(r.route.name, r.route.host) for r in both.routes] == [
        ("shop/shop#1", "shop.example.com"),
        ("shop/shop#2", ""),
    ]


def test_only_the_class_is_claimed_by_name_or_legacy_annotation() -> None:
    legacy = ingress("legacy", ingress_class=None, host="legacy.example.com")
    legacy["metadata"]["annotations"]["kubernetes.io/ingress.class"] = "canary-proxy"
    other = ingress("other", ingress_class="nginx", host="other.example.com")
    result = routes_from_ingresses([ingress("shop"), legacy, other], SERVICES)
    assert sorted(r.ingress for r in result.routes) == ["legacy", "shop"]
    nginx = routes_from_ingresses([ingress("shop"), legacy, other], SERVICES, ingress_class="nginx")
    assert [r.ingress for r in nginx.routes] == ["other"]


def test_a_custom_annotation_prefix() -> None:
    can = canary("c", "web-canary", canary_weight="30")
    can["metadata"]["annotations"] = {
        k.replace(P, "example.com/"): v for k, v in can["metadata"]["annotations"].items()
    }
    route = only(routes_from_ingresses([ingress("shop"), can], SERVICES, annotation_prefix="example.com"))
    assert route.route.config.canary_weight == 30


def test_the_oldest_ingress_wins_a_conflict_as_in_ingress_nginx() -> None:
    young = ingress("a-young", created="2026-03-01T00:00:00Z")
    old = ingress("z-old", svc="web-canary", created="2026-02-01T00:00:00Z")
    result = routes_from_ingresses([young, old], SERVICES)
    assert only(result).ingress == "z-old"
    [report] = result.reported
    assert (report.kind, report.ingress) == ("conflict", "shop/a-young")
    # the same second: ingress-nginx's sortIngressSlice puts the greater NAMESPACE/NAME first
    same_time = routes_from_ingresses([ingress("a"), ingress("b", svc="web-canary")], SERVICES)
    assert only(same_time).ingress == "b" and same_time.reported[0].ingress == "shop/a"


def test_a_second_canary_is_reported_not_merged() -> None:
    first = canary("first", "web-canary", canary_weight="10")
    second = canary("second", "web-canary", canary_weight="90", created="2026-01-03T00:00:00Z")
    result = routes_from_ingresses([ingress("shop"), second, first], SERVICES)
    route = only(result)
    assert route.canary_ingress == "first" and route.route.config.canary_weight == 10
    [report] = result.reported
    assert (report.kind, report.ingress) == ("second-canary", "shop/second")
    assert "already has the canary shop/first" in report.message


def test_a_canary_without_a_main_ingress_is_reported_and_ignored() -> None:
    elsewhere = canary("c", "web-canary", canary_weight="50")
    elsewhere["metadata"]["namespace"] = "other"  # a main in another namespace does not count
    result = routes_from_ingresses([ingress("shop"), canary("lonely", "web-canary"), elsewhere], SERVICES)
    # "lonely" matches shop/shop (same host and path): only the one in namespace other is an orphan
    kinds = {(r.kind, r.ingress) for r in result.reported}
    assert kinds == {("orphan-canary", "other/c")}
    alone = routes_from_ingresses([canary("c", "web-canary", canary_weight="50")], SERVICES)
    assert alone.routes == () and [r.kind for r in alone.reported] == ["orphan-canary"]


def test_timeouts_and_body_size_are_carried_from_the_main_ingress() -> None:
    main = ingress(
        "shop",
        annotations={"proxy-read-timeout": "120", "proxy-connect-timeout": "5", "proxy-body-size": "8m"},
    )
    can = canary(
        "c", "web-canary", canary_weight="5", **{"proxy-read-timeout": "120", "proxy-body-size": "1m"}
    )
    result = routes_from_ingresses([main, can], SERVICES)
    route = only(result)
    assert route.route.config.upstream_timeout == 120 and route.route.config.upstream_connect_timeout == 5
    assert route.body_limit == 8 << 20
    # the canary's equal timeout is the route's already; its different body size is not applied
    assert [(i.ingress, i.annotation) for i in result.ignored] == [("shop/c", P + "proxy-body-size")]
    assert "inherited from the main Ingress" in result.ignored[0].reason


@pytest.mark.parametrize(
    ("text", "size"), [("0", 0), ("512", 512), ("8k", 8192), ("1M", 1 << 20), ("2g", 2 << 30)]
)
def test_nginx_sizes(text: str, size: int) -> None:
    assert parse_nginx_size(text) == size


def test_other_annotations_and_snippets_are_listed_once_with_a_reason() -> None:
    noisy = {"configuration-snippet": "more_set_headers 'X: y';", "server-snippet": "location /x {}",
             "ssl-redirect": "false", "enable-cors": "true"}  # fmt: skip
    main = ingress("shop", paths=[("/", "Prefix"), ("/a", "Prefix")], annotations=noisy)
    can = canary("c", "web-canary", canary_weight="5", **{"configuration-snippet": "return 500;"})
    result = routes_from_ingresses([main, can], SERVICES)
    ignored = {(i.ingress, i.annotation.removeprefix(P)): i.reason for i in result.ignored}
    assert set(ignored) == {("shop/shop", k) for k in noisy} | {("shop/c", "configuration-snippet")}
    for key in (
        ("shop/shop", "configuration-snippet"),
        ("shop/shop", "server-snippet"),
        ("shop/c", "configuration-snippet"),
    ):
        assert "never executed" in ignored[key] and "security" in ignored[key]
    assert ignored[("shop/shop", "enable-cors")] == "not supported by canary-proxy"
    assert len(result.ignored) == len(ignored), "listed once per Ingress, not once per route"


def test_a_bad_canary_leaves_the_route_serving_stable() -> None:
    result = routes_from_ingresses(
        [ingress("shop"), canary("c", "web-canary", canary_weight="150")], SERVICES
    )
    route = only(result)
    assert route.canary is None and route.route.config.canary.url == route.route.config.stable.url
    [report] = result.reported
    assert report.kind == "invalid" and report.ingress == "shop/c" and "canary-weight" in report.message


def test_a_bad_timeout_falls_back_to_the_default_and_is_reported() -> None:
    paths = [("/", "Prefix"), ("/a", "Prefix")]
    result = routes_from_ingresses(
        [ingress("shop", paths=paths, annotations={"proxy-read-timeout": "soon"})], SERVICES
    )
    assert [r.route.config.upstream_timeout for r in result.routes] == [60.0, 60.0]
    assert [r.kind for r in result.reported] == ["invalid"] and "proxy-read-timeout" in result.reported[
        0
    ].message


def test_unreachable_backends_are_reported_and_the_rest_served() -> None:
    resource = ingress("res", host="res.example.com")
    resource["spec"]["rules"][0]["http"]["paths"][0]["backend"] = {
        "resource": {"kind": "Bucket", "name": "b"}
    }
    missing = ingress("missing", svc="nope", host="missing.example.com")
    bad_port = ingress("port", port="grpc", host="port.example.com")
    malformed = {
        "metadata": {"name": "broken", "namespace": "shop"},
        "spec": {"ingressClassName": "canary-proxy", "rules": "x"},
    }
    result = routes_from_ingresses([ingress("shop"), resource, missing, bad_port, malformed], SERVICES)
    assert [r.ingress for r in result.routes] == ["shop"]
    messages = {r.ingress: r.message for r in result.reported}
    assert "not a Service" in messages["shop/res"]
    assert "Service shop/nope not found" in messages["shop/missing"]
    assert "no port 'grpc'" in messages["shop/port"]
    assert "malformed" in messages["shop/broken"]


def test_argo_copies_whole_rules_so_other_services_paths_are_no_canary() -> None:
    main = ingress("shop", paths=[("/", "Prefix")])
    main["spec"]["rules"][0]["http"]["paths"].append(
        {"path": "/docs", "pathType": "Prefix", "backend": backend("docs", 80)}
    )
    can = copy.deepcopy(main)  # buildCanaryIngress: the rule with the stable Service, switched
    can["metadata"] |= {
        "name": "r-shop-canary",
        "annotations": {P + "canary": "True", P + "canary-weight": "40"},
    }
    can["spec"]["rules"][0]["http"]["paths"][0]["backend"] = backend("web-canary", 80)
    result = routes_from_ingresses([main, can], [*SERVICES, service("docs", {"http": 80}, ip="10.0.0.3")])
    assert result.reported == ()
    web, docs = result.routes
    assert web.canary_ingress == "r-shop-canary" and web.route.config.canary_weight == 40
    assert docs.canary is None and docs.route.config.canary.url == "http://10.0.0.3:80"


def test_the_routes_fit_one_route_table_in_their_order() -> None:
    ingresses = [
        ingress("b", host="b.example.com"),
        ingress("a", host="a.example.com", created="2025-01-01T00:00:00Z"),
    ]
    result = routes_from_ingresses(ingresses, SERVICES)
    table = RouteTable((r.route, r) for r in result.routes)
    assert table.conflicts == () and [r.ingress for r in result.routes] == ["a", "b"]
    found = table.lookup(b"b.example.com", b"/x")
    assert found is not None and found[1].ingress == "b"


def test_a_route_memo_gives_the_same_routes_and_forgets_what_is_gone() -> None:
    """Ingress mode rebuilds the routes after every change through a RouteMemo: its result
    must be exactly the plain translation's, step after step, and it must not grow."""
    memo = RouteMemo()
    fixture = json.loads((FIXTURES / "flagger.json").read_text())
    store: dict[tuple[str, str], dict[str, Any]] = {}
    for step in fixture["steps"]:
        meta = step["object"]["metadata"]
        store[(meta["namespace"], meta["name"])] = copy.deepcopy(step["object"])
        plain = routes_from_ingresses(list(store.values()), fixture["services"])
        memoised = routes_from_ingresses(list(store.values()), fixture["services"], parse=memo)
        memo.sweep()
        assert memoised == plain, step["note"]
        assert [r.route for r in memoised.routes] == [r.route for r in plain.routes], step["note"]
    assert len(memo._kept) <= 4, "only the last translation's parses are kept"
