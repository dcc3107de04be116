"""Failing upstreams, each a real misbehaving server on loopback: what the client gets (a
502/504, or an aborted connection once headers went out), the reason counted in
``upstream_errors_total``, and that the next request succeeds."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest

from .conftest import Backend, ProxyFactory, port_of, send_rst_on_close
from .scrape import scrape, wait_metric


def dead_url() -> str:
    """A loopback port with nothing listening: connects are refused at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


async def test_connect_failure_is_502_naming_the_version_tried(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, _ = backends
    url = dead_url()
    proxy = await proxy_factory({"stable-url": url, "canary-url": stable.url})
    async with client.get(proxy.url + "/") as r:
        assert r.status == 502
        assert r.headers["X-Canary-Version"] == "stable"
        assert "canary_proxy_bucket=" in r.headers["Set-Cookie"]
    assert (await scrape(proxy)).nonzero("canary_proxy_upstream_errors_total", "version", "reason") == {
        ("stable", "connect"): 1
    }
    upstream = await start_scripted(port=int(url.rsplit(":", 1)[1]))  # the upstream comes up
    try:
        async with client.get(proxy.url + "/") as r:
            assert r.status == 200 and await r.read() == b"ok"
    finally:
        await upstream.stop()


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


async def test_a_client_that_leaves_while_the_upstream_connect_hangs_is_a_499(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    _, canary = backends
    full = socket.socket()  # a listener never accepting, its queue full: SYNs go unanswered
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    filler = socket.create_connection(full.getsockname())
    try:
        url = f"http://127.0.0.1:{full.getsockname()[1]}"
        config = {"stable-url": url, "canary-url": canary.url, "upstream-connect-timeout": "30s"}
        proxy = await proxy_factory(config)
        _, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
        writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_metric(proxy, lambda s: s.value("canary_proxy_in_flight_requests", version="stable") == 1)
        writer.close()
        m = await wait_metric(
            proxy,
            lambda s: s.get("canary_proxy_requests_total", version="stable", code="499", method="GET") == 1,
            what="the 499",
        )
        assert m.value("canary_proxy_in_flight_requests", version="stable") == 0
        assert m.nonzero("canary_proxy_upstream_errors_total", "version", "reason") == {}
    finally:
        filler.close()
        full.close()


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
        assert (
            'canary_proxy_upstream_errors_total{reason="reset",route="default",version="stable"}'
            not in metrics
        )
        async with client.post(proxy.url + "/", data=b"body") as r:
            await r.read()
            assert r.status == 502  # its body went out on the stale connection: not replayed
    metrics = await proxy.metrics_text()
    assert (
        'canary_proxy_upstream_errors_total{reason="reset",route="default",version="stable"} 1.0' in metrics
    )


# -- a scripted upstream: one misbehaviour per request, then well-behaved --------------------

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
SHORT = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"z" * 10  # 90 bytes missing

Writer = asyncio.StreamWriter
Action = Callable[[asyncio.StreamReader, Writer], Awaitable[bool]]  # True: keep serving


async def _ok(reader: asyncio.StreamReader, writer: Writer) -> bool:
    writer.write(OK)
    return True


async def _send_then(data: bytes, then: str, reader: asyncio.StreamReader, writer: Writer) -> bool:
    writer.write(data)
    await writer.drain()
    await asyncio.sleep(0.05)
    if then == "fin":
        writer.close()
    elif then == "rst":
        send_rst_on_close(writer.get_extra_info("socket"))
        writer.transport.abort()
    elif then == "hold":
        await reader.read()  # until the proxy gives up and closes
    elif then == "late":
        await asyncio.sleep(0.6)  # past the 300 ms upstream-timeout
        writer.write(OK)
        return True
    elif then.startswith("stray:"):
        writer.write(then.removeprefix("stray:").encode())  # after the response was complete
        return True
    return then == "keep"


def _action(data: bytes, then: str) -> Action:
    return lambda reader, writer: _send_then(data, then, reader, writer)


ACTIONS: dict[str, Action] = {
    "ok": _ok,
    "silent": _action(b"", "hold"),
    "late": _action(b"", "late"),
    "bad-status-line": _action(b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok", "fin"),
    "bad-header": _action(b"HTTP/1.1 200 OK\r\nBad Header: x\r\nContent-Length: 2\r\n\r\nok", "keep"),
    "bad-content-length": _action(b"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n\r\nok", "keep"),
    "cut-head": _action(b"HTTP/1.1 200 OK\r\nContent-Le", "fin"),
    "short-body-fin": _action(SHORT, "fin"),
    "short-body-rst": _action(SHORT, "rst"),
    "short-chunked-fin": _action(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", "fin"
    ),
    "stalled-body": _action(SHORT, "hold"),
    "long-body": _action(OK + b"EXTRA BYTES", "keep"),
    # The body's second read (relayed past the parser) carries bytes beyond its length.
    "long-body-split": _action(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no", "stray:kEXTRA BYTES"),
    "long-body-later": _action(OK, "stray:HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"),
    "close-idle-fin": _action(OK, "fin"),
    "close-idle-rst": _action(OK, "rst"),
}


@dataclass
class Scripted:
    server: asyncio.Server
    script: list[str] = field(default_factory=list)  # one action per request, then "ok"
    requests: int = 0
    connections: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def start_scripted(*script: str, port: int = 0) -> Scripted:
    upstream: Scripted

    async def handle(reader: asyncio.StreamReader, writer: Writer) -> None:
        upstream.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
                await reader.readexactly(length)
                upstream.requests += 1
                name = upstream.script.pop(0) if upstream.script else "ok"
                if not await ACTIONS[name](reader, writer):
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    upstream = Scripted(await asyncio.start_server(handle, "127.0.0.1", port), list(script))
    return upstream


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    upstream = await start_scripted()
    yield upstream
    await upstream.stop()


ABORTED = "aborted"  # the client connection is aborted mid-body


async def raw_get(reader: asyncio.StreamReader, writer: Writer) -> bytes:
    """One GET on a kept-alive connection; the body of its 200."""
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 "), head
    length = next(
        int(line[15:]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")
    )
    return await asyncio.wait_for(reader.readexactly(length), 5)


@pytest.mark.parametrize(
    ("action", "outcome", "reason"),
    [
        ("silent", 504, "timeout"),
        ("late", 504, "timeout"),
        ("bad-status-line", 502, "protocol"),
        ("bad-header", 502, "protocol"),
        ("bad-content-length", 502, "protocol"),
        ("cut-head", 502, "protocol"),  # closed cleanly mid-head
        ("short-body-fin", ABORTED, "protocol"),  # closed cleanly before Content-Length was met
        ("short-chunked-fin", ABORTED, "protocol"),  # closed cleanly before the last chunk
        ("short-body-rst", ABORTED, "reset"),  # reset: a crash or a kill, not a framing error
        ("stalled-body", ABORTED, "timeout"),
        ("long-body", 200, "protocol"),  # the client got the 2 bytes promised, nothing more
        ("long-body-split", 200, "protocol"),
        ("long-body-later", 200, "protocol"),  # the extra bytes arrived while idle in the pool
    ],
)
async def test_a_misbehaving_upstream_is_answered_counted_and_recovered_from(
    backends: tuple[Backend, Backend],
    proxy_factory: ProxyFactory,
    scripted: Scripted,
    action: str,
    outcome: int | str,
    reason: str,
) -> None:
    _, canary = backends
    proxy = await proxy_factory(
        {"stable-url": scripted.url, "canary-url": canary.url, "upstream-timeout": "300ms"}
    )
    scripted.script.append(action)
    async with aiohttp.ClientSession() as client:  # keep-alive: the next request may reuse it
        if outcome == ABORTED:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with client.get(proxy.url + "/") as r:
                    assert r.status == 200
                    await r.read()
        elif outcome == 200:  # complete as framed: the client's keep-alive connection lives on
            kept = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
            assert await raw_get(*kept) == b"ok"
        else:
            async with client.get(proxy.url + "/") as r:
                assert r.status == outcome
                assert r.headers["X-Canary-Version"] == "stable"
        await wait_metric(
            proxy,
            lambda m: bool(m.nonzero("canary_proxy_upstream_errors_total", "version", "reason")),
            what="the upstream error counted",
        )
        await asyncio.sleep(0.2)  # anything that arrives late (a stray response) has arrived
        if outcome == 200:
            assert await raw_get(*kept) == b"ok"
            kept[1].close()
        for _ in range(3):  # the pool recovers: no stray byte is ever served as a response
            async with client.get(proxy.url + "/") as r:
                assert r.status == 200 and await r.read() == b"ok"
    assert (await scrape(proxy)).nonzero("canary_proxy_upstream_errors_total", "version", "reason") == {
        ("stable", reason): 1
    }


@pytest.mark.parametrize("action", ["close-idle-fin", "close-idle-rst"])
async def test_pooled_connections_the_upstream_closes_while_idle_are_skipped(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, scripted: Scripted, action: str
) -> None:
    _, canary = backends
    proxy = await proxy_factory({"stable-url": scripted.url, "canary-url": canary.url})
    scripted.script += [action, action]
    async with aiohttp.ClientSession() as client:
        for _ in range(4):
            async with client.get(proxy.url + "/") as r:
                assert r.status == 200 and await r.read() == b"ok"
            await asyncio.sleep(0.2)  # the upstream closes its side of the pooled connection
    assert scripted.requests == 4 and scripted.connections >= 3
    assert (await scrape(proxy)).nonzero("canary_proxy_upstream_errors_total", "version", "reason") == {}
