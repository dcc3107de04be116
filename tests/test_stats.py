"""``/stats``: the dashboard's chart data, computed from the same collectors as /metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry

from canary_proxy.admin.stats import (
    UNWATCHED_ROUTES,
    History,
    Sampler,
    Snapshot,
    notes_rollout,
    offered_routes,
    read_rollout,
    snapshot,
    stats_document,
)
from canary_proxy.control import ConfigControl, RolloutNotes, Routes
from canary_proxy.metrics import Metrics
from canary_proxy.rollout.state import RolloutState, encode
from canary_proxy.sources.configmap import raw_from_data

from .conftest import Backend, ProxyFactory, base_config, stats_until


def history_of(*snapshots: Snapshot) -> History:
    history = History()
    for taken in snapshots:
        history.add(taken)
    return history


def test_rates_error_share_and_quantiles_come_from_snapshot_deltas() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.init_data_plane()
    metrics.weight_ratio.labels("default").set(0.25)
    first = snapshot(registry.collect(), 100.0)
    for _ in range(18):
        metrics.count_request("default", "stable", 200, "GET", 0.02)
    for _ in range(2):
        metrics.count_request("default", "stable", 503, "GET", 0.02)
    for _ in range(10):
        metrics.count_request("default", "canary", 200, "GET", 0.3)
    metrics.count_decision("default", "canary", "header")
    second = snapshot(registry.collect(), 102.0)

    history = history_of(first, second)
    columns = history.series("default")
    assert columns["time"] == [102.0] and columns["weightPercent"] == [25.0]
    assert columns["stable"]["requestRate"] == [10.0]  # 20 requests in 2 s
    assert columns["stable"]["errorRate"] == [0.1]
    assert 0.01 < columns["stable"]["p99"][0] <= 0.025  # the (10 ms, 25 ms] bucket
    assert columns["canary"]["requestRate"] == [5.0] and columns["canary"]["errorRate"] == [0.0]
    assert 0.25 < columns["canary"]["p50"][0] <= 0.5

    document = stats_document(history, routes=["default"], effective=None, rollout=None)
    assert document["route"] == "default" and document["routes"] == ["default"]
    assert {"version": "canary", "rule": "header", "total": 1.0, "rate": 0.5} in document["decisions"]
    assert document["totals"]["stable"] == {"requests": 20.0, "errors": 2.0}


def test_no_traffic_is_a_gap_not_a_zero() -> None:
    registry = CollectorRegistry()
    Metrics(registry).init_data_plane()
    history = history_of(snapshot(registry.collect(), 1.0), snapshot(registry.collect(), 2.0))
    assert history.series("default")["canary"] == {
        "requestRate": [0.0],
        "errorRate": [None],
        "p50": [None],
        "p99": [None],
    }


def test_each_route_has_its_own_points_weight_decisions_and_totals() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for route, ratio in (("shop", 0.1), ("blog", 0.5)):
        metrics.init_data_plane(route)
        metrics.weight_ratio.labels(route).set(ratio)
    history = history_of(snapshot(registry.collect(), 10.0))
    for _ in range(4):
        metrics.count_request("shop", "canary", 500, "GET", 0.3)
        metrics.count_decision("shop", "canary", "weight")
    metrics.count_request("blog", "stable", 200, "GET", 0.02)
    metrics.count_rejected(404, "GET")  # route="none": no route's
    history.add(snapshot(registry.collect(), 11.0))
    metrics.init_data_plane("new")  # a route loaded later: gaps before its first point
    history.add(snapshot(registry.collect(), 12.0))

    shop, blog, new = (history.series(r) for r in ("shop", "blog", "new"))
    assert shop["time"] == blog["time"] == new["time"] == [11.0, 12.0]
    assert shop["weightPercent"] == [10.0, 10.0] and blog["weightPercent"] == [50.0, 50.0]
    assert shop["canary"]["requestRate"] == [4.0, 0.0] and shop["canary"]["errorRate"] == [1.0, None]
    assert shop["stable"]["requestRate"] == [0.0, 0.0]
    assert blog["stable"]["requestRate"] == [1.0, 0.0] and blog["canary"]["errorRate"] == [None, None]
    assert new["weightPercent"] == [None, None] and new["stable"]["requestRate"] == [None, 0.0]
    assert history.series("unknown")["canary"]["p99"] == [None, None]
    assert [(d["version"], d["total"]) for d in history.decisions("blog")] == [("canary", 0), ("stable", 0)]
    assert {"version": "canary", "rule": "weight", "total": 4.0, "rate": 2.0} in history.decisions("shop")
    assert history.totals("shop")["canary"] == {"requests": 4.0, "errors": 4.0}
    assert history.totals("blog") == {
        "stable": {"requests": 1.0, "errors": 0.0},
        "canary": {"requests": 0.0, "errors": 0.0},
    }
    assert "none" not in history.charts  # unrouted requests have no version to chart


def test_the_history_keeps_points_per_route_up_to_its_size() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.init_data_plane("shop")
    history = History(3)
    for second in range(6):
        metrics.count_request("shop", "stable", 200, "GET", 0.02)
        history.add(snapshot(registry.collect(), float(second)))
    assert history.series("shop")["time"] == [3.0, 4.0, 5.0]
    assert all(len(column) == 3 for column in history.charts["shop"].values())


def test_many_routes_are_sampled_only_once_stats_is_read() -> None:
    sampler = Sampler(CollectorRegistry())
    assert sampler.due(UNWATCHED_ROUTES)  # a few routes: charted from the start
    assert not sampler.due(UNWATCHED_ROUTES + 1)  # many: a snapshot costs a share of a core
    sampler.watched()
    assert sampler.due(1000)


def test_offered_routes_are_the_served_ones_then_labels_that_served() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for route in ("default", "shop", "blog", "gone"):
        metrics.init_data_plane(route)
    metrics.count_request("gone", "stable", 200, "GET", 0.02)  # removed from the config since
    latest = snapshot(registry.collect(), 1.0)
    assert offered_routes(latest, ["shop", "blog"]) == ["shop", "blog", "gone"]  # not default at 0
    assert offered_routes(None, []) == []


def test_the_rollout_beside_the_config_reads_like_status_json(tmp_path: Path) -> None:
    config = tmp_path / "canary.yaml"
    assert read_rollout(str(config), {}) is None  # no state file: no rollout
    now = time.time()
    state = RolloutState(
        phase="Progressing",
        steps="5,50,100",
        step=1,
        message="at step 2/3",
        step_started=now,
        progress_since=now,
    )
    notes = {k: v for k, v in encode(state).items() if v is not None}
    (tmp_path / "canary.yaml.rollout.json").write_text(json.dumps(notes))
    report = read_rollout(str(config), {"canary-weight": 50})
    assert report is not None
    assert report["phase"] == "Progressing" and report["stepDescription"] == "2/3 (50%)"
    assert report["weight"] == 50 and report["message"] == "at step 2/3"
    (tmp_path / "canary.yaml.rollout.json").write_text("{half a wri")
    broken = read_rollout(str(config), {})
    assert broken is not None and broken["phase"] is None and "rollout.json" in broken["error"]


def test_the_rollout_in_configmap_annotations_reads_like_status_json() -> None:
    store = "configmap shop/canary-proxy"
    assert notes_rollout(RolloutNotes(store, {}), {}) is None  # no rollout recorded
    now = time.time()
    state = RolloutState(phase="Paused", steps="5,pause,100", step=1, step_started=now, progress_since=now)
    notes = {k: v for k, v in encode(state).items() if v is not None}
    report = notes_rollout(RolloutNotes(store, notes), {"canary-weight": "5"})
    assert report is not None and report["store"] == store
    assert (report["phase"], report["stepDescription"], report["weight"]) == (
        "Paused",
        "2/3 (pause, canary at 5%)",
        "5",
    )
    broken = notes_rollout(RolloutNotes(store, {**notes, "canary-proxy.io/phase": "Sideways"}), {})
    assert broken is not None and broken["phase"] is None and "Sideways" in broken["error"]


def test_an_annotation_only_change_updates_the_rollout_but_is_no_reload() -> None:
    registry = CollectorRegistry()
    loaded: list[Routes] = []
    control = ConfigControl(Metrics(registry), [loaded.append])
    data = {"stable-url": "http://127.0.0.1:1", "canary-url": "http://127.0.0.1:2"}
    for phase in ("Progressing", "Paused"):
        raw = raw_from_data(data, {"canary-proxy.io/phase": phase, "app.kubernetes.io/x": "y"})
        assert control.offer(raw, origin="configmap shop/canary-proxy")
        assert control.rollout_notes == RolloutNotes(
            "configmap shop/canary-proxy",
            {"canary-proxy.io/phase": phase},  # the rollout's keys only
        )
    assert registry.get_sample_value("canary_proxy_config_reloads_total", {"result": "success"}) == 1
    assert len(loaded) == 1


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_stats_match_the_metrics_in_one_and_many_processes(
    backends: tuple[Backend, Backend],
    proxy_factory: ProxyFactory,
    client: aiohttp.ClientSession,
    workers: str,
) -> None:
    stable, canary = backends
    config = base_config(stable, canary, canary_weight=0, canary_by_header="X-Canary")
    proxy = await proxy_factory(config, "--workers", workers, "--access-log", "off")
    for headers in [{}] * 6 + [{"X-Canary": "always"}] * 4:
        async with client.get(proxy.url + "/", headers=headers) as r:
            assert r.status == 200
    canary.fail_status = 500
    async with client.get(proxy.url + "/", headers={"X-Canary": "always"}) as r:
        assert r.status == 500

    stats = await stats_until(proxy, lambda s: s["totals"]["canary"]["requests"] == 5)
    assert stats["totals"] == {
        "stable": {"requests": 6.0, "errors": 0.0},
        "canary": {"requests": 5.0, "errors": 1.0},
    }
    assert stats["weight"] == {"weight": 0, "total": 100, "percent": 0.0}
    assert stats["config"]["canary-by-header"] == "X-Canary" and stats["rollout"] is None
    rules = {(d["version"], d["rule"]): d["total"] for d in stats["decisions"]}
    assert rules[("canary", "header")] == 5 and rules[("stable", "weight")] == 6  # no cookies kept
    served = sum(v or 0 for v in stats["series"]["canary"]["requestRate"]) * stats["interval"]
    assert served == pytest.approx(5, abs=0.5)  # the points add up to what was served
    metrics = await proxy.metrics_text()
    assert (
        'canary_proxy_requests_total{code="500",method="GET",route="default",version="canary"} 1.0' in metrics
    )


async def test_the_dashboard_page_and_its_files_are_served(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    async with client.get(proxy.admin_url + "/") as r:
        assert r.status == 200 and r.content_type == "text/html"
        page = await r.text()
    assert '<script src="/dashboard/vendor/uPlot.iife.min.js">' in page
    assert '<script src="/dashboard/dashboard.js">' in page
    for path in (
        "/dashboard/dashboard.js",
        "/dashboard/vendor/uPlot.iife.min.js",
        "/dashboard/vendor/LICENSE",
    ):
        async with client.get(proxy.admin_url + path) as r:
            assert r.status == 200, path
    assert "http://" not in page and "https://" not in page  # works offline: no CDN


async def test_stats_of_one_route_among_several(
    backends: tuple[Backend, Backend],
    proxy_factory: ProxyFactory,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    stable, canary = backends
    config = tmp_path / "routes.yaml"
    shop = {**base_config(stable, canary, canary_weight=0), "name": "shop", "host": "shop.example"}
    blog = {**base_config(canary, stable, canary_weight=100), "name": "blog", "host": "blog.example"}
    config.write_text(yaml.safe_dump_all([shop, blog]))
    proxy = await proxy_factory(None, config_path=config)
    for host, times in (("shop.example", 3), ("blog.example", 2)):
        for _ in range(times):
            async with client.get(proxy.url + "/", headers={"Host": host}) as r:
                assert r.status == 200

    blog_stats = await stats_until(
        proxy, lambda s: s["totals"]["canary"]["requests"] == 2, path="/stats?route=blog"
    )
    assert blog_stats["route"] == "blog" and blog_stats["routes"] == ["shop", "blog"]
    assert blog_stats["weight"]["percent"] == 100.0 and blog_stats["config"]["stable-url"] == canary.url
    assert blog_stats["totals"]["stable"]["requests"] == 0 and blog_stats["rollout"] is None
    shop_stats = await stats_until(proxy, lambda s: s["totals"]["stable"]["requests"] == 3)  # the first
    assert shop_stats["route"] == "shop" and shop_stats["weight"]["percent"] == 0.0
    assert shop_stats["totals"]["canary"]["requests"] == 0
    assert sum(v or 0 for v in shop_stats["series"]["stable"]["requestRate"]) == pytest.approx(3, abs=0.5)
    async with client.get(proxy.admin_url + "/stats?route=nope") as r:
        assert r.status == 404
        assert await r.json() == {"error": "no route 'nope'", "routes": ["shop", "blog"]}
