"""import-ingress on a table of real-world-shaped ingress-nginx manifests, through the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from canary_proxy.routes import parse_route


def ingress(
    name: str,
    service: str,
    port: Any,
    *,
    canary: dict[str, str] | None = None,
    host: str = "shop.example.com",
    extra_paths: int = 0,
    v1beta1: bool = False,
) -> dict[str, Any]:
    annotations = {"kubernetes.io/ingress.class": "nginx", "nginx.ingress.kubernetes.io/ssl-redirect": "true"}
    if canary is not None:
        annotations["nginx.ingress.kubernetes.io/canary"] = "true"
        annotations.update({f"nginx.ingress.kubernetes.io/{k}": v for k, v in canary.items()})
    if v1beta1:
        backend: dict[str, Any] = {"serviceName": service, "servicePort": port}
        api = "extensions/v1beta1"
    else:
        key = "number" if isinstance(port, int) else "name"
        backend = {"service": {"name": service, "port": {key: port}}}
        api = "networking.k8s.io/v1"
    paths = [{"path": "/", "pathType": "Prefix", "backend": backend}]
    paths += [{"path": f"/extra{i}", "pathType": "Prefix", "backend": backend} for i in range(extra_paths)]
    return {
        "apiVersion": api,
        "kind": "Ingress",
        "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
        "spec": {"ingressClassName": "nginx", "rules": [{"host": host, "http": {"paths": paths}}]},
    }


def service(name: str, ports: dict[str, int]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"ports": [{"name": n, "port": p, "targetPort": p} for n, p in ports.items()]},
    }


def run(tmp_path: Path, main: list[Any], canary: list[Any], *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "main.yaml").write_text(yaml.safe_dump_all(main))
    (tmp_path / "canary.yaml").write_text(yaml.safe_dump_all(canary))
    return subprocess.run(
        [sys.executable, "-m", "canary_proxy", "import-ingress", str(tmp_path / "main.yaml"),
         str(tmp_path / "canary.yaml"), *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


STABLE = "http://shop-v1.shop.svc.cluster.local:80"
CANARY = "http://shop-v2.shop.svc.cluster.local:8080"
WHERE = {"host": "shop.example.com", "path": "/", "path-type": "prefix"}  # issue #18: a route's keys

CASES: list[tuple[str, dict[str, str], dict[str, str]]] = [
    ("weight", {"canary-weight": "10"}, {"canary-weight": "10"}),
    ("weight-total", {"canary-weight": "5", "canary-weight-total": "1000"},
     {"canary-weight": "5", "canary-weight-total": "1000"}),
    ("header", {"canary-by-header": "X-Canary"}, {"canary-by-header": "X-Canary"}),
    ("header-value", {"canary-by-header": "X-Region", "canary-by-header-value": "yes"},
     {"canary-by-header": "X-Region", "canary-by-header-value": "yes"}),
    ("header-pattern", {"canary-by-header": "X-User", "canary-by-header-pattern": "beta-.*"},
     {"canary-by-header": "X-User", "canary-by-header-pattern": "beta-.*"}),
    ("cookie+weight", {"canary-by-cookie": "canary", "canary-weight": "20"},
     {"canary-by-cookie": "canary", "canary-weight": "20"}),
]  # fmt: skip


@pytest.mark.parametrize(("case", "annotations", "expected"), CASES, ids=[c[0] for c in CASES])
def test_canary_annotations_map_to_config_keys(
    tmp_path: Path, case: str, annotations: dict[str, str], expected: dict[str, str]
) -> None:
    result = run(
        tmp_path,
        [ingress("shop", "shop-v1", 80)],
        [ingress("shop-canary", "shop-v2", 8080, canary=annotations)],
    )
    assert result.returncode == 0, result.stderr
    manifest = yaml.safe_load(result.stdout)
    assert manifest["kind"] == "ConfigMap" and manifest["metadata"] == {
        "name": "canary-proxy",
        "namespace": "shop",
        "labels": {"canary-proxy.io/import": "canary-proxy"},
    }
    assert manifest["data"] == {**WHERE, "stable-url": STABLE, "canary-url": CANARY, **expected}
    parse_route(manifest["data"], name="imported")  # what it prints is a valid route
    lines = result.stdout.splitlines()
    for line in lines[lines.index("data:") + 1 :]:
        assert line.split(": ", 1)[1].startswith('"'), line  # every string value quoted
    # the canary Ingress's own ssl-redirect is reported, never silently dropped
    assert "nginx.ingress.kubernetes.io/ssl-redirect: not carried over" in result.stderr


def test_named_ports_are_resolved_through_services_or_exit_2(tmp_path: Path) -> None:
    main = [ingress("shop", "shop-v1", "http"), service("shop-v1", {"http": 80, "metrics": 9100})]
    canary = [ingress("shop-canary", "shop-v2", "web", canary={"canary-weight": "1"})]
    result = run(tmp_path, main, canary)
    assert result.returncode == 2
    assert "named port 'web' of Service shop-v2" in result.stderr
    (tmp_path / "svc.yaml").write_text(yaml.safe_dump(service("shop-v2", {"web": 8080})))
    result = run(tmp_path, main, canary, "--service", str(tmp_path / "svc.yaml"))
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["data"]["stable-url"] == STABLE


def test_every_path_is_a_route_and_a_canary_for_another_host_is_listed(tmp_path: Path) -> None:
    # Issue #18: extra paths used to be listed as not carried over; each is now a ConfigMap.
    main = [ingress("shop", "shop-v1", 80, extra_paths=2)]
    sticky = {"canary-weight": "50", "affinity": "cookie", "session-cookie-name": "route"}
    canary = [ingress("shop-canary", "shop-v2", 8080, host="beta.example.com", canary=sticky)]
    result = run(tmp_path, main, canary)
    assert result.returncode == 0, result.stderr
    manifests = list(yaml.safe_load_all(result.stdout))
    assert [m["metadata"]["name"] for m in manifests] == [
        "canary-proxy-1",
        "canary-proxy-2",
        "canary-proxy-3",
    ]
    assert [m["data"]["path"] for m in manifests] == ["/", "/extra0", "/extra1"]
    for manifest in manifests:
        assert manifest["metadata"]["labels"] == {"canary-proxy.io/import": "canary-proxy"}
        assert manifest["data"]["canary-url"] == manifest["data"]["stable-url"] == STABLE
    # the canary serves another host: it attaches to no route, and says so
    assert "canary for host beta.example.com path / (prefix): no main Ingress" in result.stderr
    assert "nginx.ingress.kubernetes.io/affinity: not carried over" in result.stderr
    assert "session-cookie-name: not carried over" in result.stderr


def test_the_main_ingress_annotations_are_carried_or_listed(tmp_path: Path) -> None:
    main = ingress("shop", "shop-v1", 80)
    main["metadata"]["annotations"].update(
        {
            "nginx.ingress.kubernetes.io/proxy-read-timeout": "120",
            "nginx.ingress.kubernetes.io/proxy-connect-timeout": "5",
            "nginx.ingress.kubernetes.io/proxy-body-size": "8m",
            "nginx.ingress.kubernetes.io/configuration-snippet": "more_set_headers 'X-A: b';",
        }
    )
    result = run(tmp_path, [main], [ingress("c", "shop-v2", 8080, canary={"canary-weight": "5"})])
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)["data"]
    assert data["upstream-timeout"] == "120" and data["upstream-connect-timeout"] == "5"
    assert "configuration-snippet: not carried over: never executed" in result.stderr
    assert "proxy-body-size: not carried over" in result.stderr and "--max-body-size" in result.stderr


def test_legacy_v1beta1_ingresses_and_custom_name(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        [ingress("shop", "shop-v1", 80, v1beta1=True)],
        [ingress("shop-canary", "shop-v2", 8080, canary={"canary-weight": "30"}, v1beta1=True)],
        "--name", "shop-canary-proxy",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = yaml.safe_load(result.stdout)
    assert manifest["metadata"]["name"] == "shop-canary-proxy"
    assert manifest["data"]["canary-weight"] == "30"


@pytest.mark.parametrize(
    ("main_canary", "canary_canary", "message"),
    [(True, True, "give the main Ingress first"), (False, False, "is not annotated")],
)
def test_the_order_and_the_canary_annotation_are_checked(
    tmp_path: Path, main_canary: bool, canary_canary: bool, message: str
) -> None:
    main = ingress("shop", "shop-v1", 80, canary={"canary-weight": "1"} if main_canary else None)
    canary = ingress("shop-canary", "shop-v2", 8080, canary={"canary-weight": "1"} if canary_canary else None)
    result = run(tmp_path, [main], [canary])
    assert result.returncode == 2 and message in result.stderr


def test_an_out_of_range_weight_is_refused(tmp_path: Path) -> None:
    result = run(tmp_path, [ingress("shop", "shop-v1", 80)],
                 [ingress("c", "shop-v2", 8080, canary={"canary-weight": "150"})])  # fmt: skip
    assert result.returncode == 2 and "canary-weight" in result.stderr


def test_mirror_annotations_are_listed_with_what_to_use_instead(tmp_path: Path) -> None:
    main = [ingress("shop", "shop-v1", 80)]
    mirror = {"canary-weight": "5", "mirror-target": "https://shadow.example.com$request_uri"}
    result = run(tmp_path, main, [ingress("shop-canary", "shop-v2", 8080, canary=mirror)])
    assert result.returncode == 0, result.stderr
    assert "mirror-target: not carried over" in result.stderr and "canary-mirror-percent" in result.stderr
    assert "canary-mirror-percent" not in yaml.safe_load(result.stdout)["data"]
