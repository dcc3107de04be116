"""Prometheus metrics on the admin port, scraped from the real proxy process."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import string
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from .conftest import Backend, ProxyFactory, ProxyProcess, base_config, port_of
from .scrape import LABELS, TYPES, Scrape, eventually, parse, scrape, wait_metric

HEADER = "X-Canary"
COOKIE = "canary_qa"
STICKY = "canary_proxy_bucket"  # the default sticky-cookie name
KNOWN_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A loopback port that refuses connections: bound (so nobody else takes it), never listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


async def get(
    client: aiohttp.ClientSession,
    proxy: ProxyProcess,
    *,
    method: str = "GET",
    path: str = "/",
    headers: dict[str, str] | None = None,
) -> int:
    async with client.request(method, proxy.url + path, headers=headers) as r:
        await r.read()
        return r.status


async def test_first_scrape_has_help_zeros_and_no_extra_labels(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    stable, canary = backends
    before = time.time()
    proxy = await proxy_factory(base_config(stable, canary, canary_weight=25))
    m = await scrape(proxy)

    # prometheus_client also exports each counter's (and histogram's) ``_created`` time.
    assert {base_family(n) for n in m.families if n.startswith("canary_proxy_")} == set(TYPES)
    for name, family in m.families.items():
        assert family.documentation.strip(), f"{name} has no help text"
        if name in TYPES:
            assert family.type == TYPES[name], name
    assert_only_table_labels(m)

    for version in ("stable", "canary"):
        assert m.value("canary_proxy_request_duration_seconds_count", version=version) == 0
        assert m.value("canary_proxy_in_flight_requests", version=version) == 0
        assert m.value("canary_proxy_websocket_connections", version=version) == 0
        assert m.value("canary_proxy_routing_decisions_total", version=version, rule="weight") == 0
    assert m.value("canary_proxy_config_reloads_total", result="success") == 1
    assert m.value("canary_proxy_config_reloads_total", result="failure") == 0
    assert m.value("canary_proxy_canary_weight_ratio") == 0.25
    assert m.value("canary_proxy_worker_restarts_total") == 0
    loaded = m.value("canary_proxy_config_last_success_timestamp_seconds")
    assert before - 1 <= loaded <= time.time() + 1


def base_family(name: str) -> str:
    base = name.removesuffix("_created")
    return base if base in TYPES else name


def assert_only_table_labels(m: Scrape) -> None:
    for name, family in m.families.items():
        allowed = LABELS.get(base_family(name))
        assert allowed is not None or not name.startswith("canary_proxy_"), name
        for sample in family.samples:
            labels = set(sample.labels) - {"le"}
            assert labels <= (allowed or set()), f"{sample.name} has labels {labels}"
            assert "pid" not in sample.labels


async def test_exact_values_after_a_known_sequence(
    backends: tuple[Backend, Backend],
    proxy_factory: ProxyFactory,
    client: aiohttp.ClientSession,
    dead_url: str,
) -> None:
    stable, canary = backends
    cfg: dict[str, Any] = {
        "canary_by_header": HEADER,
        "canary_by_cookie": COOKIE,
        "canary_weight": 0,
        "canary_failover": False,
    }
    proxy = await proxy_factory(base_config(stable, canary, **cfg))

    # -- forced rules and the weight at 0
    assert await get(client, proxy, headers={HEADER: "always"}) == 200
    assert await get(client, proxy, method="POST", headers={HEADER: "never"}) == 200
    assert await get(client, proxy, headers={"Cookie": f"{COOKIE}=always"}) == 200
    assert await get(client, proxy, headers={"Cookie": f"{STICKY}=5"}) == 200
    for _ in range(3):
        assert await get(client, proxy) == 200
    assert await get(client, proxy, method="DELETE") == 200
    # -- weight 100
    await proxy.reload(base_config(stable, canary, **{**cfg, "canary_weight": 100}))
    for _ in range(2):
        assert await get(client, proxy) == 200
    # -- a dead canary: 502 without failover, then a failover to stable with it
    await proxy.reload(
        {**base_config(stable, canary, **{**cfg, "canary_weight": 100}), "canary-url": dead_url}
    )
    assert await get(client, proxy) == 502
    await proxy.reload(
        {
            **base_config(stable, canary, **{**cfg, "canary_weight": 100, "canary_failover": True}),
            "canary-url": dead_url,
        }
    )
    assert await get(client, proxy) == 200
    # -- a slow stable behind a short upstream-timeout: 504
    await proxy.reload(base_config(stable, canary, **cfg, upstream_timeout="200ms"))
    stable.delay = 1.0
    assert await get(client, proxy) == 504
    stable.delay = 0.0
    # -- the upstream resets mid-body: the client sees a truncated 200
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get(proxy.url + "/reset") as r:
            assert r.status == 200
            await r.read()
    # -- the client leaves before the response: 499, and in flight while it waits
    await proxy.reload(base_config(stable, canary, **cfg, upstream_timeout="10s"))
    stable.delay = 0.5
    hits = stable.hits
    _, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await eventually(lambda: stable.hits > hits, what="the slow request reached stable")
    m = await scrape(proxy)
    assert m.value("canary_proxy_in_flight_requests", version="stable") == 1
    writer.close()
    stable.delay = 0.0
    await wait_metric(
        proxy,
        lambda s: s.get("canary_proxy_requests_total", version="stable", code="499", method="GET") == 1,
        what="the 499",
    )
    # -- a WebSocket to the canary, gauged while open
    async with client.ws_connect(proxy.url + "/ws", headers={HEADER: "always"}) as ws:
        await ws.send_str("hi")
        assert (await ws.receive_str()) == "canary:hi"
        m = await scrape(proxy)
        assert m.value("canary_proxy_websocket_connections", version="canary") == 1
        assert m.value("canary_proxy_in_flight_requests", version="canary") == 1
    m = await wait_metric(
        proxy,
        lambda s: s.get("canary_proxy_requests_total", version="canary", code="101", method="GET") == 1,
        what="the WebSocket counted at close",
    )

    assert m.nonzero("canary_proxy_requests_total", "version", "code", "method") == {
        ("canary", "200", "GET"): 4,  # header, cookie, 2x weight 100
        ("canary", "502", "GET"): 1,
        ("canary", "101", "GET"): 1,
        ("stable", "200", "POST"): 1,
        ("stable", "200", "DELETE"): 1,
        ("stable", "200", "GET"): 6,  # sticky, 3x weight, failover, reset mid-body
        ("stable", "504", "GET"): 1,
        ("stable", "499", "GET"): 1,
    }
    assert m.nonzero("canary_proxy_routing_decisions_total", "version", "rule") == {
        ("canary", "header"): 2,  # one HTTP, one WebSocket
        ("canary", "cookie"): 1,
        ("canary", "weight"): 3,  # 2x 200 and the 502
        ("stable", "header"): 1,
        ("stable", "sticky"): 1,
        ("stable", "weight"): 7,  # 3x 200, DELETE, 504, reset, 499
        ("stable", "failover"): 1,
    }
    assert m.nonzero("canary_proxy_upstream_errors_total", "version", "reason") == {
        ("canary", "connect"): 2,  # the 502 and the failed-over attempt
        ("stable", "timeout"): 1,
        ("stable", "reset"): 1,
    }
    assert m.value("canary_proxy_request_duration_seconds_count", version="canary") == 6
    assert m.value("canary_proxy_request_duration_seconds_count", version="stable") == 10
    # The 504 waited out the 200 ms upstream-timeout: its duration is in the histogram.
    assert m.value("canary_proxy_request_duration_seconds_sum", version="stable") >= 0.2
    for version in ("stable", "canary"):
        assert m.value("canary_proxy_in_flight_requests", version=version) == 0
        assert m.value("canary_proxy_websocket_connections", version=version) == 0
    assert m.value("canary_proxy_config_reloads_total", result="success") == 6
    assert m.value("canary_proxy_config_reloads_total", result="failure") == 0
    assert m.value("canary_proxy_canary_weight_ratio") == 0
    assert_only_table_labels(m)


async def test_a_rejected_config_counts_once(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary, canary_weight=10))
    first = (await scrape(proxy)).value("canary_proxy_config_last_success_timestamp_seconds")
    bad = base_config(stable, canary, canary_weight=400)
    await proxy.reload(bad, expect_ok=False)
    # The same bad bytes written again (a new inode and mtime, so the watcher re-reads them).
    # Nothing is logged for content already rejected, so there is no event to await: give the
    # watcher 3 poll intervals (POLL_INTERVAL is 0.25 s) to see it.
    proxy.write_config(bad)
    await asyncio.sleep(0.8)
    m = await scrape(proxy)
    assert m.value("canary_proxy_config_reloads_total", result="failure") == 1
    assert m.value("canary_proxy_canary_weight_ratio") == 0.1  # the last good config stays

    await proxy.reload(base_config(stable, canary, canary_weight=50))
    m = await scrape(proxy)
    assert m.value("canary_proxy_config_reloads_total", result="success") == 2
    assert m.value("canary_proxy_config_reloads_total", result="failure") == 1
    assert m.value("canary_proxy_canary_weight_ratio") == 0.5
    assert m.value("canary_proxy_config_last_success_timestamp_seconds") > first


def random_token(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_uppercase + string.digits, k=rng.randint(3, 10)))


# Extension methods the HTTP parser knows, so they reach the proxy; none is on our allow-list.
EXTENSION_METHODS = ("PROPFIND", "MKCOL", "PURGE", "REPORT", "LOCK", "SEARCH", "LINK")


async def test_client_input_cannot_create_series(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    assert await get(client, proxy) == 200  # the GET series now exists
    before = await wait_metric(
        proxy,
        lambda s: s.get("canary_proxy_requests_total", version="stable", code="200", method="GET") == 1,
        what="the first GET counted",
    )
    rng = random.Random(1234)
    proxied = 0
    for i in range(40):
        method = EXTENSION_METHODS[i % len(EXTENSION_METHODS)] if i % 2 else random_token(rng)
        path = "/" + random_token(rng) + "?q=" + random_token(rng)
        async with client.request(method, proxy.url + path) as r:
            await r.read()
            if "X-Canary-Version" in r.headers:
                assert r.status == 200, method
                proxied += 1
    assert proxied >= 20  # at least every extension method went through
    after = await wait_metric(
        proxy,
        lambda s: (
            s.get("canary_proxy_requests_total", version="stable", code="200", method="OTHER") == proxied
        ),
        what=f"{proxied} requests counted as OTHER",
    )
    methods = {dict(k)["method"] for k in after.series("canary_proxy_requests_total")}
    assert methods <= KNOWN_METHODS | {"OTHER"}
    # The only new series: that counter, and the parser's 400s for the random tokens (counted
    # unrouted, with the same OTHER), each with its _created timestamp.
    new = set(after.samples) - set(before.samples)
    assert {name for name, _ in new} <= {
        "canary_proxy_requests_total",
        "canary_proxy_requests_created",
    }
    assert {tuple(sorted(dict(labels).items())) for _, labels in new} == {
        (("code", "200"), ("method", "OTHER"), ("route", "default"), ("version", "stable")),
        (("code", "400"), ("method", "OTHER"), ("route", "none"), ("version", "none")),
    }, new


async def test_a_method_the_parser_does_not_know_is_a_400_and_never_proxied(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """llhttp knows a fixed list of methods (HTTP, WebDAV, RTSP...): those outside our own
    set are proxied and counted as OTHER (the test above); any other token is refused with
    400 by the parser, before routing, so it can never create a series either."""
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    async with client.request("FOO123", proxy.url + "/") as r:
        assert r.status == 400
    assert stable.hits == 0 and canary.hits == 0
    m = await scrape(proxy)
    methods = {dict(labels).get("method") for labels in m.series("canary_proxy_requests_total")}
    assert "FOO123" not in methods


@pytest.mark.parametrize("workers", ["1", "2"])  # two: the multiprocess exposition
async def test_promtool_accepts_a_real_scrape(
    backends: tuple[Backend, Backend],
    proxy_factory: ProxyFactory,
    client: aiohttp.ClientSession,
    workers: str,
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool not found on PATH: install Debian's 'prometheus' package "
            "(apt-get install -y prometheus); this check must not be skipped"
        )
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary, canary_weight=50), "--workers", workers)
    for _ in range(4):
        assert await get(client, proxy) == 200
    text = (
        await wait_metric(
            proxy,
            lambda m: sum(m.series("canary_proxy_requests_total").values()) == 4,
            what="the 4 requests counted",
        )
    ).text
    parse(text)  # and prometheus_client's parser reads it too
    proc = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(text.encode()), 30)
    report = (out + err).decode()
    assert proc.returncode == 0, report
    assert report.strip() == "", report  # no lint warnings either
