"""Proxying as a production ingress does it: headers, bodies, streaming, WebSockets."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from .conftest import Backend, ProxyFactory, base_config, peak_rss_mib, port_of, raw_request

GiB = 1 << 30


def header_pairs(record: dict[str, object]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in record["headers"]]  # type: ignore[attr-defined]


async def test_hop_by_hop_headers_are_dropped_and_forwarding_headers_set(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    request = (
        b"GET /a/../b//c?x=%41&y=%2f&z HTTP/1.1\r\n"
        b"Host: shop.example.com\r\n"
        b"Connection: keep-alive, X-Drop-Me\r\n"
        b"X-Drop-Me: secret\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Foo\r\n"
        b"Upgrade: h2c\r\n"
        b"X-Forwarded-For: 203.0.113.7\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: evil.example\r\n"
        b"X-Custom: kept\r\n"
        b"Connection: close\r\n\r\n"
    )
    response = await raw_request(port_of(proxy.url), request)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    record = json.loads(body)
    assert record["path"] == "/a/../b//c?x=%41&y=%2f&z"  # byte for byte, not normalised
    headers = {k.lower(): v for k, v in header_pairs(record)}
    for gone in ("connection", "x-drop-me", "keep-alive", "proxy-connection", "proxy-authorization",
                 "te", "trailer", "upgrade"):  # fmt: skip
        assert gone not in headers, gone
    assert headers["host"] == "shop.example.com"
    # The edge replaces what an untrusted client says about itself (--trust-forwarded-from keeps it).
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-real-ip"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-port"] == str(port_of(proxy.url))
    assert headers["x-forwarded-host"] == "shop.example.com"
    assert headers["x-custom"] == "kept"
    assert len(headers["x-request-id"]) == 32


async def test_response_hop_by_hop_headers_are_dropped(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            text="ok", headers={"Connection": "X-Internal", "X-Internal": "1", "Keep-Alive": "timeout=1",
                                "Proxy-Authenticate": "Basic", "X-App": "yes"},
        )  # fmt: skip

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        _, canary = backends
        proxy = await proxy_factory({"stable-url": f"http://127.0.0.1:{port}", "canary-url": canary.url})
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/") as r:
            assert r.headers["X-App"] == "yes"
            for gone in ("X-Internal", "Keep-Alive", "Proxy-Authenticate"):
                assert gone not in r.headers
            assert await r.text() == "ok"
    finally:
        await runner.cleanup()


async def test_each_request_on_one_keepalive_connection_is_routed_on_its_own(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary, canary_by_header="X-Canary"))
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as s:
        seen = []
        for value in ("always", "never", "always", "never"):
            async with s.get(proxy.url + "/", headers={"X-Canary": value}) as r:
                seen.append((await r.json())["version"])
    assert seen == ["canary", "stable", "canary", "stable"]
    assert stable.hits == 2 and canary.hits == 2


async def test_head_204_and_chunked_upload(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    async with client.head(proxy.url + "/bytes/1000") as r:
        assert r.status == 200 and r.headers["Content-Length"] == "1000", await r.text()
        assert await r.read() == b""

    async def gen():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b"z" * 1000

    async with client.post(proxy.url + "/upload", data=gen()) as r:
        assert (await r.json())["body_bytes"] == 10_000
    stable.fail_status = 204
    async with client.get(proxy.url + "/") as r:
        assert r.status == 204 and await r.read() == b""


async def test_expect_100_continue(backends: tuple[Backend, Backend], proxy_factory: ProxyFactory) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
    writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    record = stable.requests[-1]
    assert record["body_bytes"] == 5
    assert "expect" not in {k.lower() for k, _ in header_pairs(record)}


async def test_pipelined_requests_are_answered_in_order_on_one_connection(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
    writer.write(  # in one segment: all parsed in one read, begun one after the other
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /c HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\n\r\n"  # answered by the proxy itself
        b"HEAD /bytes/7 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /e HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    data = await asyncio.wait_for(reader.read(-1), 10)  # until the proxy closes after /e
    writer.close()
    answers: list[tuple[bytes, bytes]] = []  # (status, body)
    for method in ("GET", "POST", "GET", "HEAD", "GET"):
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        fields = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        length = 0 if method == "HEAD" else int(fields[b"content-length"])
        answers.append((lines[0].split(b" ")[1], data[:length]))
        data = data[length:]
    assert data == b""
    assert [status for status, _ in answers] == [b"200", b"200", b"417", b"200", b"200"]
    assert [json.loads(answers[i][1])["path"] for i in (0, 1, 4)] == ["/a", "/b", "/e"]
    assert json.loads(answers[1][1])["body_bytes"] == 5


async def test_a_gibibyte_streams_both_ways_in_bounded_memory(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    """1 GiB up and 1 GiB down through the proxy; its peak RSS (VmHWM, exact) stays < 150 MiB."""
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary), "--access-log", "off")
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + f"/bytes/{GiB}") as r:
            assert r.headers["Content-Length"] == str(GiB)
            received = 0
            async for chunk in r.content.iter_chunked(1 << 20):
                received += len(chunk)
        assert received == GiB

        async def upload():  # type: ignore[no-untyped-def]
            block = b"u" * (1 << 20)
            for _ in range(1024):
                yield block

        async with s.post(proxy.url + "/upload", data=upload(), headers={"Content-Length": str(GiB)}) as r:
            assert (await r.json())["body_bytes"] == GiB
    peak = peak_rss_mib(proxy.pid)
    print(f"proxy peak RSS after 1 GiB down + 1 GiB up: {peak:.1f} MiB")
    assert peak < 150


async def test_websocket_is_relayed_both_ways_to_the_chosen_version(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary, canary_by_header="X-Canary"))
    async with client.ws_connect(
        proxy.url + "/ws", headers={"X-Canary": "always"}, protocols=("chat",)
    ) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("hello")
        assert (await ws.receive_str()) == "canary:hello"
        await ws.send_bytes(b"\x01\x02\x03")
        assert (await ws.receive_bytes()) == b"\x03\x02\x01"
        await ws.send_str("close-me")
        msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 4001
    async with client.ws_connect(proxy.url + "/ws") as ws:
        await ws.send_str("hi")
        assert (await ws.receive_str()) == "stable:hi"
    assert canary.hits == 1 and stable.hits == 1


async def test_an_upstream_that_refuses_the_websocket_upgrade_is_relayed_as_it_answered(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect(proxy.url + "/not-a-websocket")
    assert info.value.status == 200  # the upstream answered 200 instead of 101: relayed as is
    stable.fail_status = 403
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect(proxy.url + "/not-a-websocket")
    assert info.value.status == 403
    stable.fail_status = None
    async with client.ws_connect(proxy.url + "/ws") as ws:  # and the proxy still works
        await ws.send_str("again")
        assert (await ws.receive_str()) == "stable:again"
