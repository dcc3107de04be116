"""``serve --configmap-selector``: every matching ConfigMap is a route, through the real
proxy process and the real Kubernetes client, against the fake API server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from .conftest import Backend, ProxyProcess, start_proxy, stop_proxy
from .fakekube import FakeKube
from .scrape import scrape
from .test_configmap import cli

LABELS = {"app.kubernetes.io/part-of": "canary-proxy"}
SELECTOR = "app.kubernetes.io/part-of=canary-proxy"


def data(stable: Backend, canary: Backend, **keys: Any) -> dict[str, str]:
    extra = {k.replace("_", "-"): str(v) for k, v in keys.items()}
    return {"stable-url": stable.url, "canary-url": canary.url, **extra}


async def serve_selector(fake: FakeKube, tmp_path: Path, *args: str) -> ProxyProcess:
    assert fake.kubeconfig is not None
    return await start_proxy(
        None, tmp_path, "--configmap-selector", SELECTOR, "--kubeconfig", str(fake.kubeconfig), *args,
        use_config=False,
    )  # fmt: skip


async def backend_for(url: str, host: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url + "/", headers={"Host": host}) as r,
    ):
        await r.read()
        return r.status, r.headers.get("X-Backend", "")


async def answered(url: str, host: str, want: str | int, timeout: float = 1.0) -> None:
    """Within ``timeout`` (the issue's 1 s), ``host`` is answered by ``want`` (a backend or a
    status). The change happens inside the proxy process: polled, bounded."""
    async with asyncio.timeout(timeout):
        while True:
            status, backend = await backend_for(url, host)
            if want in (status, backend):
                return
            await asyncio.sleep(0.02)


async def test_each_matching_configmap_is_a_route_added_changed_and_deleted_live(
    fake_kube: FakeKube, four: list[Backend], tmp_path: Path
) -> None:
    shop1, shop2, blog1, blog2 = four
    fake_kube.put_configmap("shop", data(shop1, shop2, host="shop.example.com"), labels=LABELS)
    fake_kube.put_configmap("other", data(blog1, blog2, host="other.example.com"))  # no label: not ours
    proxy = await serve_selector(fake_kube, tmp_path)
    try:
        await answered(proxy.url, "shop.example.com", "shop-v1", timeout=5)
        assert (await backend_for(proxy.url, "other.example.com"))[0] == 404

        fake_kube.put_configmap(
            "blog", data(blog1, blog2, host="blog.example.com"), namespace="default", labels=LABELS
        )
        await answered(proxy.url, "blog.example.com", "blog-v1")  # added
        fake_kube.put_configmap("blog", data(blog1, blog2, host="blog.example.com", canary_weight=100))
        await answered(proxy.url, "blog.example.com", "blog-v2")  # changed

        mark = len(proxy.logs)
        fake_kube.put_configmap("bad", {"stable-url": "nope", "host": "bad.example.com"}, labels=LABELS)
        entry = await proxy.wait_log(lambda e: str(e.get("msg", "")).startswith("rejected route"), since=mark)
        assert "default/bad" in entry["msg"] and "not served" in entry["msg"], entry
        assert (await backend_for(proxy.url, "shop.example.com"))[1] == "shop-v1"  # the others live on
        assert (await scrape(proxy)).value("canary_proxy_config_reloads_total", result="failure") == 1

        fake_kube.delete_configmap("blog")
        await answered(proxy.url, "blog.example.com", 404)  # deleted
        document = await proxy.admin_json("/config")
        assert [r["name"] for r in document["routes"]] == ["default/shop"]
        assert [r["name"] for r in document["rejected"]] == ["default/bad"]
    finally:
        await stop_proxy(proxy)


async def test_the_older_of_two_conflicting_configmaps_wins(
    fake_kube: FakeKube, four: list[Backend], tmp_path: Path
) -> None:
    shop1, shop2, blog1, _ = four
    fake_kube.put_configmap(
        "young", data(blog1, blog1, host="x.example"), labels=LABELS, created="2026-02-01T00:00:00Z"
    )
    fake_kube.put_configmap(
        "old", data(shop1, shop2, host="x.example"), labels=LABELS, created="2026-01-01T00:00:00Z"
    )
    proxy = await serve_selector(fake_kube, tmp_path)
    try:
        await answered(proxy.url, "x.example", "shop-v1", timeout=5)
        document = await proxy.admin_json("/config")
        assert document["conflicts"] == [
            "route default/young conflicts with default/old on host x.example path / (prefix); "
            "default/old wins"
        ]
    finally:
        await stop_proxy(proxy)


async def test_routes_lists_the_cluster_routes_and_names_the_bad_ones(
    fake_kube: FakeKube, four: list[Backend]
) -> None:
    shop1, shop2, _, _ = four
    fake_kube.put_configmap(
        "shop", data(shop1, shop2, host="shop.example.com", canary_weight=5), labels=LABELS
    )
    fake_kube.put_configmap("bad", {"stable-url": "nope"}, labels=LABELS)
    assert fake_kube.kubeconfig is not None
    code, out, err = await cli(
        "routes", "--configmap-selector", SELECTOR, "--kubeconfig", str(fake_kube.kubeconfig)
    )
    assert code == 2  # a route is invalid: the table still shows the valid ones
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "HOST", "PATH", "TYPE"]
    assert lines[1].split()[:4] == ["default/shop", "shop.example.com", "/", "prefix"]
    assert "5/100" in lines[1]
    assert "error: default/bad: stable-url" in err
