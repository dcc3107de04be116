"""Traffic mirroring against the real proxy process, real backends, and a canary that stalls."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from .conftest import Backend, ProxyFactory, base_config, port_of, raw_request
from .scrape import Scrape, eventually, scrape, wait_metric

MIRRORED = "canary_proxy_mirror_requests_total"
SKIPPED = "canary_proxy_mirror_skipped_total"


def mirrored(s: Scrape) -> dict[str, float]:
    return {code: v for (code,), v in s.nonzero(MIRRORED, "code").items()}


def lower(record: dict[str, Any]) -> dict[str, str]:
    """A request the echo backend recorded: its headers by lower-case name."""
    return {k.lower(): v for k, v in record["headers"]}


def skipped(s: Scrape, reason: str) -> float:
    return s.value(SKIPPED, reason=reason)


async def test_weighted_stable_requests_are_copied_to_the_canary(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary, canary_weight=0, canary_mirror_percent=100))
    ids = []
    for i in range(10):
        async with client.get(f"{proxy.url}/get/{i}?q=1") as r:
            assert r.status == 200 and (await r.json())["version"] == "stable"
            ids.append(r.headers["X-Request-Id"])
    for i in range(5):
        async with client.post(f"{proxy.url}/post/{i}", data=b"p" * (1000 * (i + 1))) as r:
            assert r.status == 200 and (await r.json())["body_bytes"] == 1000 * (i + 1)
            ids.append(r.headers["X-Request-Id"])
    await eventually(lambda: len(canary.requests) == 15, what="15 copies reached the canary")
    assert len(stable.requests) == 15
    copies = {lower(c)["x-request-id"]: c for c in canary.requests}
    assert set(copies) == set(ids)  # each copy carries its original's request id
    for copy in copies.values():
        headers = lower(copy)
        assert headers["x-canary-mirror"] == "1"
        assert headers["x-forwarded-for"] == "127.0.0.1"
    assert sorted(c["path"] for c in canary.requests if c["method"] == "GET") == [
        f"/get/{i}?q=1" for i in range(10)
    ]
    assert sorted(c["body_bytes"] for c in canary.requests if c["method"] == "POST") == [
        1000, 2000, 3000, 4000, 5000,
    ]  # fmt: skip
    s = await wait_metric(proxy, lambda s: mirrored(s) == {"200": 15}, what="15 copies counted")
    # Copies are not client requests: requests_total and the routing decisions have none.
    assert s.nonzero("canary_proxy_requests_total", "version", "method") == {
        ("stable", "GET"): 10, ("stable", "POST"): 5,
    }  # fmt: skip
    assert s.nonzero("canary_proxy_routing_decisions_total", "version", "rule") == {("stable", "weight"): 15}
    assert s.value("canary_proxy_mirror_request_duration_seconds_count") == 15
    assert not [a for a in proxy.access if a.get("version") == "canary"]


async def test_requests_forced_to_stable_are_not_mirrored(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    config = base_config(
        stable, canary, canary_weight=0, canary_mirror_percent=100,
        canary_by_header="X-Canary", canary_by_cookie="canary",
    )  # fmt: skip
    proxy = await proxy_factory(config)
    async with client.get(f"{proxy.url}/header", headers={"X-Canary": "never"}) as r:
        assert (await r.json())["version"] == "stable"
    async with client.get(f"{proxy.url}/cookie", headers={"Cookie": "canary=never"}) as r:
        assert (await r.json())["version"] == "stable"
    async with client.get(f"{proxy.url}/sticky", headers={"Cookie": "canary_proxy_bucket=42"}) as r:
        assert (await r.json())["version"] == "stable"  # a sticky user: the weight's choice
    async with client.get(f"{proxy.url}/weight") as r:
        assert (await r.json())["version"] == "stable"
    await wait_metric(proxy, lambda s: mirrored(s) == {"200": 2}, what="two copies")
    assert sorted(c["path"] for c in canary.requests) == ["/sticky", "/weight"]
    # A request the header sends to the canary is served by it, and not mirrored either.
    async with client.get(f"{proxy.url}/to-canary", headers={"X-Canary": "always"}) as r:
        assert (await r.json())["version"] == "canary"
    s = await scrape(proxy)
    assert mirrored(s) == {"200": 2}
    assert [c["path"] for c in canary.requests] == ["/sticky", "/weight", "/to-canary"]


async def test_the_mirrored_share_follows_the_percentage(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary, canary_weight=0, canary_mirror_percent=25))
    n, p = 800, 0.25
    for _ in range(n):
        async with client.get(f"{proxy.url}/") as r:
            assert r.status == 200
    s = await scrape(proxy)
    decided = s.value("canary_proxy_routing_decisions_total", version="stable", rule="weight")
    assert decided == n
    copies = await_total = sum(mirrored(s).values())
    await eventually(lambda: len(canary.requests) >= await_total, what="copies arrived")
    # Binomial(800, 0.25): sd 12.2. Six sd (+-73) fail by chance about once in 500 million runs.
    assert abs(copies - n * p) <= 6 * math.sqrt(n * p * (1 - p)), copies


async def test_bodies_over_the_limit_are_skipped_and_counted(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(
        base_config(stable, canary, canary_mirror_percent=100, canary_mirror_max_body="1KiB")
    )
    port = port_of(proxy.url)

    def post(path: str, head: bytes, body: bytes) -> bytes:
        return (
            b"POST "
            + path.encode()
            + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
            + head
            + b"\r\n"
            + body
        )

    big = b"b" * 2048
    answer = await raw_request(port, post("/declared", b"Content-Length: 2048\r\n", big))
    assert answer.startswith(b"HTTP/1.1 200") and b'"body_bytes": 2048' in answer
    chunked = b"400\r\n" + big[:1024] + b"\r\n400\r\n" + big[1024:] + b"\r\n0\r\n\r\n"
    answer = await raw_request(port, post("/chunked-big", b"Transfer-Encoding: chunked\r\n", chunked))
    assert answer.startswith(b"HTTP/1.1 200") and b'"body_bytes": 2048' in answer
    s = await wait_metric(proxy, lambda s: skipped(s, "body-too-large") == 2, what="two skips")
    assert mirrored(s) == {}
    # A chunked body under the limit is copied, with a Content-Length instead of the chunks.
    small = b"200\r\n" + b"s" * 512 + b"\r\n0\r\n\r\n"
    answer = await raw_request(port, post("/chunked-small", b"Transfer-Encoding: chunked\r\n", small))
    assert answer.startswith(b"HTTP/1.1 200")
    await wait_metric(proxy, lambda s: mirrored(s) == {"200": 1}, what="the small body copied")
    [copy] = canary.requests
    headers = lower(copy)
    assert copy["path"] == "/chunked-small" and copy["body_bytes"] == 512
    assert headers["content-length"] == "512" and "transfer-encoding" not in headers
    assert len(stable.requests) == 3


# -- a canary that stalls ---------------------------------------------------------------------


@dataclass
class StallingCanary:
    """Accepts each request and answers none until ``release`` is set."""

    url: str = ""
    held: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def stalling() -> AsyncIterator[StallingCanary]:
    canary = StallingCanary()

    async def handler(request: web.Request) -> web.Response:
        canary.held.append(request.path)
        canary.arrived.set()
        await canary.release.wait()
        return web.Response(text="late\n")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    canary.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield canary
    canary.release.set()
    await runner.cleanup()


async def test_a_stalled_canary_never_holds_up_stable(
    backends: tuple[Backend, Backend],
    stalling: StallingCanary,
    proxy_factory: ProxyFactory,
    client: aiohttp.ClientSession,
) -> None:
    stable, _ = backends
    config = {
        "stable-url": stable.url, "canary-url": stalling.url, "canary-mirror-percent": 100,
        "canary-mirror-max-in-flight": 4, "canary-mirror-timeout": "60s",
    }  # fmt: skip
    proxy = await proxy_factory(config)
    for i in range(12):
        async with client.get(f"{proxy.url}/r{i}") as r:
            assert r.status == 200 and (await r.json())["version"] == "stable"
    # Every stable answer came back while the canary still holds every copy it got: no
    # client request waited for one. The bound: 4 copies in flight, the other 8 skipped.
    await eventually(lambda: len(stalling.held) == 4, what="4 copies held by the canary")
    s = await wait_metric(proxy, lambda s: skipped(s, "in-flight-limit") == 8, what="8 skipped")
    assert mirrored(s) == {}
    assert stalling.held == ["/r0", "/r1", "/r2", "/r3"]
    stalling.release.set()
    s = await wait_metric(proxy, lambda s: mirrored(s) == {"200": 4}, what="the 4 copies answered")
    # Room again: the next request is copied.
    async with client.get(f"{proxy.url}/after") as r:
        assert r.status == 200
    await wait_metric(proxy, lambda s: mirrored(s) == {"200": 5}, what="a copy after the release")


async def test_a_copy_times_out_and_a_dead_canary_is_an_error(
    backends: tuple[Backend, Backend],
    stalling: StallingCanary,
    proxy_factory: ProxyFactory,
    client: aiohttp.ClientSession,
) -> None:
    stable, canary = backends
    config = {
        "stable-url": stable.url, "canary-url": stalling.url, "canary-mirror-percent": 100,
        "canary-mirror-timeout": "200ms",
    }  # fmt: skip
    proxy = await proxy_factory(config)
    async with client.get(f"{proxy.url}/slow") as r:
        assert r.status == 200
    s = await wait_metric(proxy, lambda s: mirrored(s) == {"timeout": 1}, what="a timed-out copy")
    assert s.value("canary_proxy_mirror_request_duration_seconds_bucket", le="0.1") == 0
    assert s.value("canary_proxy_mirror_request_duration_seconds_bucket", le="0.25") == 1
    # A canary that is not listening: connect refused, counted as error; stable unaffected.
    await canary.stop()
    await proxy.reload({**config, "canary-url": canary.url})
    async with client.get(f"{proxy.url}/dead") as r:
        assert r.status == 200 and (await r.json())["version"] == "stable"
    s = await wait_metric(proxy, lambda s: mirrored(s).get("error") == 1, what="an error copy")
    assert s.nonzero("canary_proxy_upstream_errors_total", "version", "reason") == {}  # not user traffic
