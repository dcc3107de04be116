"""Client limits: each ``serve`` flag, tested with a real misbehaving client on a raw socket."""

from __future__ import annotations

import asyncio

import pytest

from canary_proxy.values import parse_size

from .conftest import Backend, ProxyFactory, base_config, port_of, raw_request


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 5) -> bytes:
    """Everything the server sends until it closes the connection (bounded wait)."""
    return await asyncio.wait_for(reader.read(), timeout)


async def test_a_client_that_never_finishes_its_head_is_closed(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary), "--client-header-timeout", "300ms")
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # slowloris: never ends the head
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await closed_by_server(reader) == b""
    assert loop.time() - started < 3
    writer.close()
    silent, silent_writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))  # sends nothing
    assert await closed_by_server(silent) == b""
    silent_writer.close()
    assert stable.hits == 0


async def test_idle_keepalive_connections_are_closed(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary), "--keepalive-timeout", "300ms")
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    rest = await closed_by_server(reader)  # the body, then EOF once idle for 300 ms
    assert b'"version": "stable"' in rest
    writer.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n",
        b"GET /" + b"p" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(6)) + b"\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Endless: " + b"b" * 5000,  # never completes
    ],
    ids=["big-header", "big-url", "too-many-headers", "incomplete-oversize"],
)
async def test_oversize_heads_get_431(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, request_bytes: bytes
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(
        base_config(stable, canary), "--max-header-size", "1KiB", "--max-headers", "5"
    )
    response = await raw_request(port_of(proxy.url), request_bytes)
    assert response.startswith(b"HTTP/1.1 431"), response[:100]
    assert stable.hits == 0
    ok = await raw_request(port_of(proxy.url), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200")


async def test_bodies_over_the_limit_get_413(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary), "--max-body-size", "1KiB")
    port = port_of(proxy.url)
    declared = await raw_request(
        port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n" + b"z" * 2000
    )
    assert declared.startswith(b"HTTP/1.1 413")
    assert stable.hits == 0  # a declared length over the limit never reaches an upstream
    chunked = b"".join(b"200\r\n" + b"z" * 0x200 + b"\r\n" for _ in range(3)) + b"0\r\n\r\n"
    streamed = await raw_request(
        port, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    )
    assert streamed.startswith(b"HTTP/1.1 413")
    assert stable.requests == []  # it may have started upstream, but never completed there
    fits = await raw_request(
        port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1024\r\n\r\n" + b"z" * 1024
    )
    assert fits.startswith(b"HTTP/1.1 200")


async def test_connections_beyond_the_limit_are_refused_quickly(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary), "--max-connections", "3")
    held = [await asyncio.open_connection("127.0.0.1", port_of(proxy.url)) for _ in range(3)]
    for _, writer in held:  # make sure the proxy has accepted all three
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    for reader, _ in held:
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
    assert (await closed_by_server(reader)).startswith(b"HTTP/1.1 503")
    for _, w in held:
        w.close()
    writer.close()


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"xchunked", b"identity"])
async def test_transfer_codings_other_than_chunked_are_refused(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, coding: bytes
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    response = await raw_request(
        port_of(proxy.url),
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + coding + b"\r\n\r\n0\r\n\r\n",
    )
    assert response.split(b" ", 2)[1] in (b"400", b"501"), response[:100]
    assert stable.hits == 0


@pytest.mark.parametrize(
    ("text", "size"), [("8KiB", 8192), ("1MiB", 1 << 20), ("2GiB", 2 << 30), ("512", 512)]
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["8KB", "1.5MiB", "-1", "lots", ""])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)
