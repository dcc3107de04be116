"""Many routes in one proxy, through the real process: by host and path, from a file's
documents and from a directory, changed live one route at a time."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from .conftest import Backend, ProxyFactory, port_of, raw_request
from .scrape import scrape, wait_metric


def route(stable: Backend, canary: Backend, **keys: Any) -> dict[str, Any]:
    return {
        "stable-url": stable.url,
        "canary-url": canary.url,
        **{k.replace("_", "-"): v for k, v in keys.items()},
    }


def write(path: Path, *documents: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump_all(documents))
    tmp.replace(path)


async def get(url: str, host: str, path: str = "/", **headers: str) -> tuple[int, str, str]:
    """(status, the backend that answered or "", the proxy's version header)."""
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
        session.get(url + path, headers={"Host": host, **headers}) as r,
    ):
        await r.read()
        return r.status, r.headers.get("X-Backend", ""), r.headers.get("X-Canary-Version", "")


async def answered(url: str, host: str, path: str, want: str | int, timeout: float = 5.0) -> None:
    """Poll until ``host``+``path`` is answered by the backend ``want`` (or with the status
    ``want``): a reload inside the proxy process is no event the test can await. Bounded."""
    async with asyncio.timeout(timeout):
        while True:
            status, backend, _ = await get(url, host, path)
            if want in (status, backend):
                return
            await asyncio.sleep(0.02)


def requests(**labels: str) -> Any:
    """A check for wait_metric: the request counter with these labels is 1."""
    return lambda s: s.get("canary_proxy_requests_total", method="GET", **labels) == 1


async def test_two_services_by_host_and_path_from_one_file(
    four: list[Backend], proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    shop1, shop2, blog1, blog2 = four
    config = tmp_path / "routes.yaml"
    write(
        config,
        route(shop1, shop2, host="shop.example.com", canary_by_header="X-Canary"),
        route(blog1, blog2, host="*.blog.example", name="blogs"),
        route(blog2, blog1, host="shop.example.com", path="/beta", path_type="exact"),
    )
    proxy = await proxy_factory(None, config_path=config)
    url = proxy.url
    assert await get(url, "shop.example.com") == (200, "shop-v1", "stable")
    assert await get(url, "SHOP.example.com:8080", "/cart", **{"X-Canary": "always"}) == (
        200,
        "shop-v2",
        "canary",
    )
    assert await get(url, "me.blog.example", "/") == (200, "blog-v1", "stable")
    assert await get(url, "shop.example.com", "/beta") == (200, "blog-v2", "stable")  # exact beats the prefix
    assert await get(url, "shop.example.com", "/beta/x") == (200, "shop-v1", "stable")
    status, backend, _ = await get(url, "other.example", "/")
    assert (status, backend) == (404, "")  # no route: the proxy answers, no upstream sees it
    m = await wait_metric(
        proxy,
        lambda s: (
            s.get("canary_proxy_requests_total", route="none", version="none", code="404", method="GET") == 1
        ),
        what="the 404 counted unrouted",
    )
    assert (
        m.value(
            "canary_proxy_requests_total", route="routes.yaml#1", version="canary", code="200", method="GET"
        )
        == 1
    )
    assert (
        m.value("canary_proxy_requests_total", route="blogs", version="stable", code="200", method="GET") == 1
    )
    document = await proxy.admin_json("/config")
    assert [(r["name"], r["host"], r["path"], r["path-type"]) for r in document["routes"]] == [
        ("routes.yaml#1", "shop.example.com", "/", "prefix"),
        ("blogs", "*.blog.example", "/", "prefix"),
        ("routes.yaml#3", "shop.example.com", "/beta", "exact"),
    ]
    assert document["conflicts"] == [] and document["rejected"] == []


async def test_a_directory_of_routes_changes_live_one_route_at_a_time(
    four: list[Backend], proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    shop1, shop2, blog1, blog2 = four
    folder = tmp_path / "routes"
    folder.mkdir()
    write(folder / "shop.yaml", route(shop1, shop2, host="shop.example.com"))
    proxy = await proxy_factory(None, "--config-dir", str(folder), use_config=False)
    url = proxy.url
    assert (await get(url, "blog.example.com"))[0] == 404
    write(folder / "blog.yaml", route(blog1, blog2, host="blog.example.com"))  # a route comes
    await answered(url, "blog.example.com", "/", "blog-v1")
    write(folder / "blog.yaml", route(blog1, blog2, host="blog.example.com", canary_weight=100))
    await answered(url, "blog.example.com", "/", "blog-v2")
    assert (await get(url, "shop.example.com"))[1] == "shop-v1"  # the other route is untouched

    mark = len(proxy.logs)
    (folder / "blog.yaml").write_text("host: blog.example.com\nstable-url: nope\n")  # a bad change
    entry = await proxy.wait_log(lambda e: str(e.get("msg", "")).startswith("rejected route"), since=mark)
    assert "blog.yaml" in entry["msg"] and "keeping its last good version" in entry["msg"], entry
    assert (await get(url, "blog.example.com"))[1] == "blog-v2"  # its last good version serves
    assert (await get(url, "shop.example.com"))[1] == "shop-v1"
    assert (await scrape(proxy)).value("canary_proxy_config_reloads_total", result="failure") == 1
    document = await proxy.admin_json("/config")
    assert [r["name"] for r in document["rejected"]] == ["blog.yaml"]

    (folder / "blog.yaml").unlink()  # a route goes
    await answered(url, "blog.example.com", "/", 404)


async def test_conflicting_routes_the_first_file_wins_and_is_reported(
    four: list[Backend], proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    shop1, shop2, blog1, _ = four
    folder = tmp_path / "routes"
    folder.mkdir()
    write(folder / "a.yaml", route(shop1, shop2, host="x.example"))
    write(folder / "b.yaml", route(blog1, blog1, host="x.example"))
    proxy = await proxy_factory(None, "--config-dir", str(folder), use_config=False)
    assert (await get(proxy.url, "x.example"))[1] == "shop-v1"
    document = await proxy.admin_json("/config")
    assert document["conflicts"] == [
        "route b.yaml conflicts with a.yaml on host x.example path / (prefix); a.yaml wins"
    ]
    assert [(r["name"], r["served"]) for r in document["routes"]] == [("a.yaml", True), ("b.yaml", False)]


async def test_the_default_backend_takes_what_no_route_matches(
    four: list[Backend], proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    shop1, shop2, blog1, _ = four
    config = tmp_path / "routes.yaml"
    write(config, route(shop1, shop2, host="shop.example.com"))
    proxy = await proxy_factory(None, "--default-backend", blog1.url, config_path=config)
    assert (await get(proxy.url, "shop.example.com"))[1] == "shop-v1"
    assert (await get(proxy.url, "unknown.example"))[:2] == (200, "blog-v1")


async def test_a_config_of_today_is_one_default_route(
    four: list[Backend], proxy_factory: ProxyFactory
) -> None:
    shop1, shop2, _, _ = four
    proxy = await proxy_factory(route(shop1, shop2))
    assert (await get(proxy.url, "anything.example", "/x"))[1] == "shop-v1"
    assert "routes" not in await proxy.admin_json("/config")  # the flat config, as before routes
    m = await wait_metric(
        proxy,
        lambda s: s.get("canary_proxy_requests_total", version="stable", code="200", method="GET") == 1,
        what="counted on the default route",
    )
    assert (
        m.value("canary_proxy_requests_total", route="default", version="stable", code="200", method="GET")
        == 1
    )


async def test_routes_with_two_workers(
    four: list[Backend], proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    shop1, shop2, blog1, blog2 = four
    config = tmp_path / "routes.yaml"
    write(config, route(shop1, shop2, host="shop.example.com"), route(blog1, blog2, host="blog.example.com"))
    proxy = await proxy_factory(None, "--workers", "2", config_path=config)
    for _ in range(4):  # whichever worker takes the connection
        assert (await get(proxy.url, "blog.example.com"))[1] == "blog-v1"
        assert (await get(proxy.url, "shop.example.com"))[1] == "shop-v1"
    response = await raw_request(port_of(proxy.url), b"GET / HTTP/1.1\r\nHost: none.example\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 404")
