"""Failing upstreams: 502 on connect failure, 504 on no headers, failover, mid-body resets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from .conftest import Backend, ProxyFactory, base_config


def dead_url() -> str:
    """A loopback port with nothing listening: connects are refused at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


@pytest.fixture
async def silent_upstream() -> AsyncIterator[str]:
    """Accepts connections and reads requests but never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # until the proxy gives up and closes

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_connect_failure_is_502_naming_the_version_tried(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, _ = backends
    proxy = await proxy_factory({"stable-url": dead_url(), "canary-url": stable.url})
    async with client.get(proxy.url + "/") as r:
        assert r.status == 502
        assert r.headers["X-Canary-Version"] == "stable"
        assert "canary_proxy_bucket=" in r.headers["Set-Cookie"]


async def test_no_response_headers_within_upstream_timeout_is_504(
    backends: tuple[Backend, Backend],
    proxy_factory: ProxyFactory,
    client: aiohttp.ClientSession,
    silent_upstream: str,
) -> None:
    _, canary = backends
    proxy = await proxy_factory(
        {"stable-url": silent_upstream, "canary-url": canary.url, "upstream-timeout": "300ms"}
    )
    async with client.get(proxy.url + "/") as r:
        assert r.status == 504
        assert r.headers["X-Canary-Version"] == "stable"


async def test_canary_connect_failure_fails_over_to_stable(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, _ = backends
    config = {"stable-url": stable.url, "canary-url": dead_url(), "canary-weight": 100}
    proxy = await proxy_factory(config)
    async with client.post(proxy.url + "/x", data=b"payload") as r:
        assert r.status == 200
        assert r.headers["X-Canary-Version"] == "stable"
        assert (await r.json())["body_bytes"] == 7  # the body was not lost by the failed attempt
    await proxy.reload({**config, "canary-failover": False})
    async with client.get(proxy.url + "/") as r:
        assert r.status == 502
        assert r.headers["X-Canary-Version"] == "canary"


async def test_upstream_reset_after_headers_aborts_the_client_connection(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get(proxy.url + "/reset") as r:
            assert r.status == 200
            await r.read()  # promised 1 MB, got 1000 bytes and a closed connection
    async with client.get(proxy.url + "/") as r:  # the proxy and the pool recover
        assert r.status == 200


async def test_garbage_from_the_upstream_is_502(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    _, canary = backends
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        proxy = await proxy_factory({"stable-url": url, "canary-url": canary.url})
        async with client.get(proxy.url + "/") as r:
            assert r.status == 502
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def one_shot_upstream() -> AsyncIterator[tuple[str, list[int]]]:
    """Answers the first request on each connection (keep-alive), then closes the connection
    when a second request arrives on it, unanswered: a stale pooled connection."""
    served: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
        await reader.readexactly(length)
        served.append(1)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the next request on this connection...
        writer.transport.abort()  # ...is never answered

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", served
    server.close()
    await server.wait_closed()


async def test_a_stale_pooled_connection_is_retried_once_for_idempotent_requests(
    backends: tuple[Backend, Backend],
    proxy_factory: ProxyFactory,
    one_shot_upstream: tuple[str, list[int]],
) -> None:
    url, served = one_shot_upstream
    _, canary = backends
    proxy = await proxy_factory({"stable-url": url, "canary-url": canary.url})
    connector = aiohttp.TCPConnector(limit=1)  # one client connection: one pooled upstream one
    async with aiohttp.ClientSession(connector=connector) as client:
        for _ in range(3):
            async with client.get(proxy.url + "/") as r:
                assert r.status == 200 and await r.read() == b"ok"
        assert len(served) == 3  # each retry went to a fresh connection and was answered
        metrics = await proxy.metrics_text()
        assert 'canary_proxy_upstream_errors_total{reason="reset",version="stable"}' not in metrics
        async with client.post(proxy.url + "/", data=b"body") as r:
            await r.read()
            assert r.status == 502  # its body went out on the stale connection: not replayed
    metrics = await proxy.metrics_text()
    assert 'canary_proxy_upstream_errors_total{reason="reset",version="stable"} 1.0' in metrics
