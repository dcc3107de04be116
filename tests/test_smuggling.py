"""Issue #15: request smuggling, connection poisoning and request validation, through the real
proxy process to raw-socket upstreams that record exactly what each connection received.

The upstreams (tests/rawupstream.py) answer each request as soon as its head arrives and only
then read its body, like Node's http server answering a 404: a head that announces more body
than the proxy sends leaves the upstream reading the next user's request as that body.
The invariant checked throughout: on every upstream connection, the bytes are exactly framed
requests, and a request cut short is the last thing that connection ever carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from .conftest import ProxyFactory, ProxyProcess, port_of
from .rawupstream import Answer, RawConnection, RawRequest, RawUpstream, UpstreamFactory, framing_violations
from .scrape import Scrape, eventually, wait_metric

WS_HEADERS = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
H2C_HEADERS = b"Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
VICTIM = b"GET /account HTTP/1.1\r\nHost: t\r\nCookie: session=victim-secret\r\n\r\n"


def proxy_config(stable: RawUpstream, canary: RawUpstream, **extra: Any) -> dict[str, Any]:
    """Everything to stable (canary-weight 0) unless a request names ``X-Canary: always``."""
    config: dict[str, Any] = {
        "stable-url": stable.url,
        "canary-url": canary.url,
        "canary-weight": 0,
        "canary-by-header": "X-Canary",
        "upstream-timeout": "2s",
    }
    config.update({k.replace("_", "-"): v for k, v in extra.items()})
    return config


@pytest.fixture
async def upstreams(raw_upstreams: UpstreamFactory) -> tuple[RawUpstream, RawUpstream]:
    return await raw_upstreams("stable"), await raw_upstreams("canary")


Connect = Callable[[ProxyProcess], Awaitable["Client"]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """``await connect(proxy)``: a Client on the proxy's port, closed when the test ends,
    whatever it asserted."""
    opened: list[Client] = []

    async def factory(proxy: ProxyProcess) -> Client:
        client = await Client.open(proxy)
        opened.append(client)
        return client

    yield factory
    for client in opened:
        await client.close()


# -- a raw client that parses the responses it reads ---------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    raw: bytes = b""

    def header(self, name: str) -> str | None:
        low = name.lower().encode()
        found = [v for n, v in self.headers if n.lower() == low]
        return found[-1].decode("latin-1") if found else None

    @property
    def target(self) -> str | None:
        """Which request the upstream answered (the raw upstream says so); None: the proxy's own."""
        return self.header("X-Target")

    def __repr__(self) -> str:
        return f"<{self.status} for {self.target or 'proxy'} {self.body[:80]!r}>"


@dataclass
class Read:
    responses: list[Response] = field(default_factory=list)
    ended: str = ""  # "stop": the awaited response came; "eof"; "timeout" (the proxy hung); "malformed"
    raw: bytes = b""

    @property
    def final(self) -> list[Response]:
        return [r for r in self.responses if r.status >= 200 or r.status == 101]


class Client:
    """A client connection on a raw socket: send exact bytes, read and frame the responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buf = b""
        self.all = b""
        self.eof = False

    @classmethod
    async def open(cls, proxy: ProxyProcess) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port_of(proxy.url)))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def _more(self) -> bool:
        try:
            data = await self.reader.read(65536)
        except ConnectionError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        self.all += data
        return True

    async def _until(self, sep: bytes) -> bytes | None:
        while (end := self.buf.find(sep)) < 0:
            if not await self._more():
                return None
        data, self.buf = self.buf[: end + len(sep)], self.buf[end + len(sep) :]
        return data

    async def _exactly(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not await self._more():
                return None
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    async def _response(self, head_request: bool) -> Response | None:
        head = await self._until(b"\r\n\r\n")
        if head is None:
            return None
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ValueError(f"bad status line {lines[0]!r}")
        headers = [(n.strip(), v.strip()) for n, _, v in (line.partition(b":") for line in lines[1:])]
        response = Response(int(parts[1]), headers, raw=head)
        if response.status < 200 or response.status in (101, 204, 304) or head_request:
            return response
        length = response.header("Content-Length")
        if length is not None:
            body = await self._exactly(int(length))
            if body is None:
                raise ValueError(f"response body cut short: {response}")
            response.body = body
        elif (response.header("Transfer-Encoding") or "").lower() == "chunked":
            while True:
                size_line = await self._until(b"\r\n")
                if size_line is None:
                    raise ValueError("chunked response body cut short")
                size = int(size_line.split(b";")[0], 16)
                chunk = await self._exactly(size + 2)
                if chunk is None:
                    raise ValueError("chunked response body cut short")
                if size == 0:
                    break
                response.body += chunk[:-2]
        else:
            while await self._more():
                pass
            response.body, self.buf = self.buf, b""
        response.raw += response.body
        return response

    async def read(
        self, *, until: str | None = None, count: int = 0, timeout: float = 5.0, heads: int = 0
    ) -> Read:
        """Responses until one answers ``until`` (its X-Target), ``count`` final ones, EOF or
        ``timeout`` (a hang). Interim (1xx) responses are kept too. The first ``heads``
        responses answer HEAD requests: they have no body."""
        result = Read()

        async def run() -> None:
            while True:
                response = await self._response(head_request=len(result.final) < heads)
                if response is None:
                    result.ended = "eof"
                    return
                result.responses.append(response)
                if (until is not None and response.target == until) or (count and len(result.final) >= count):
                    result.ended = "stop"
                    return
                if response.status == 101:
                    result.ended = "stop"
                    return

        try:
            await asyncio.wait_for(run(), timeout)
        except TimeoutError:
            result.ended = "timeout"
        except ValueError as exc:
            result.ended = f"malformed: {exc}"
        result.raw = self.all
        return result

    async def closed(self, timeout: float = 5.0) -> bool:
        """True if the proxy closes the connection (after what it still sends) within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while await self._more():
                    pass
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def exchange(proxy: ProxyProcess, data: bytes, *, timeout: float = 5.0) -> Read:
    client = await Client.open(proxy)
    try:
        await client.send(data)
        return await client.read(count=1, timeout=timeout)
    finally:
        await client.close()


async def nothing_reached(proxy: ProxyProcess, *upstreams: RawUpstream) -> None:
    """Nothing but a sentinel request sent now reached any upstream (requests are dispatched
    in arrival order, so once the sentinel arrived anything sent before would have too)."""
    read = await exchange(proxy, b"GET /sentinel HTTP/1.1\r\nHost: t\r\n\r\n")
    assert [r.status for r in read.final] == [200], read
    for upstream in upstreams:
        others = [str(r) for r in upstream.requests if r.target != "/sentinel"]
        assert not others, f"reached upstream {upstream.name}: {others}\n{upstream.describe()}"


async def assert_framed(*upstreams: RawUpstream) -> None:
    """Once every upstream connection is between requests or closed, every one of them holds
    only exactly framed requests (and at most a last one cut short, then closed)."""
    problems: list[str] = []
    for upstream in upstreams:
        try:
            await upstream.settled(timeout=3)
        except AssertionError as exc:
            problems.append(str(exc))
    problems += framing_violations(*upstreams)
    assert not problems, "\n".join(problems) + "\n" + "\n".join(u.describe() for u in upstreams)


def own_request(upstream: RawUpstream, target: str) -> RawRequest:
    found = [r for r in upstream.requests if r.target == target]
    assert len(found) == 1, f"{target} arrived {len(found)} times as a request\n{upstream.describe()}"
    return found[0]


# -- finding 1: an upgrade request with a body poisons a pooled upstream connection ------

POISONERS = {
    "custom-upgrade-no-body": b"POST /x HTTP/1.1\r\nHost: t\r\nUpgrade: x\r\nConnection: Upgrade\r\n"
    b"Content-Length: 60\r\n\r\n",
    "websocket-no-body": b"GET /x HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    + WS_HEADERS
    + b"Content-Length: 60\r\n\r\n",
    "h2c-with-body": b"POST /x HTTP/1.1\r\nHost: t\r\nUpgrade: h2c\r\n"
    + H2C_HEADERS
    + b"Content-Length: 60\r\n\r\n"
    + b"b" * 60,
    "custom-upgrade-partial-body": b"POST /x HTTP/1.1\r\nHost: t\r\nUpgrade: x\r\nConnection: Upgrade\r\n"
    b"Content-Length: 60\r\n\r\n" + b"p" * 20,
}


@pytest.mark.parametrize("poison", list(POISONERS.values()), ids=list(POISONERS))
async def test_an_upgrade_request_with_a_body_never_poisons_the_next_users_connection(
    upstreams: tuple[RawUpstream, RawUpstream], proxy_factory: ProxyFactory, poison: bytes, connect: Connect
) -> None:
    stable, canary = upstreams
    proxy = await proxy_factory(proxy_config(stable, canary))
    attacker = await connect(proxy)
    await attacker.send(poison)
    first = await attacker.read(count=1, timeout=3)
    websocket = b"websocket" in poison

    victim = await connect(proxy)
    await victim.send(VICTIM)
    answer = await victim.read(count=1, timeout=4)
    await stable.wait(lambda: any(b"/account" in c.raw for c in stable.connections), what="/account sent")

    account = own_request(stable, "/account")  # never read as the body of another request
    assert account.complete and account.method == "GET"
    assert account.header("Cookie") == "session=victim-secret"
    leaked = [str(r) for r in stable.requests if r is not account and b"session=" in r.raw]
    assert not leaked, f"the victim's cookie is inside another request: {leaked}\n{stable.describe()}"
    assert [(r.status, r.target) for r in answer.final] == [(200, "/account")], answer
    if websocket:
        assert "/x" not in stable.targets(), "a WebSocket handshake with a body reached the upstream"
        assert [r.status for r in first.final] == [400], first
        assert await attacker.closed(), "the connection of a WebSocket handshake with a body stays open"
    else:
        upgrade = own_request(stable, "/x")
        assert upgrade.header("Upgrade") is None, "a non-WebSocket Upgrade was forwarded"
        assert upgrade.length == 60 and poison.endswith(upgrade.body)
    await attacker.close()
    await victim.close()
    await assert_framed(stable, canary)


# -- finding 2: the body of such a request is parsed as requests of its own ----------------

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: t\r\nX-Canary: always\r\n\r\n"


def upgrade_with_body(upgrade: bytes, body: bytes) -> bytes:
    connection = H2C_HEADERS if upgrade == b"h2c" else b"Connection: Upgrade\r\n"
    extra = WS_HEADERS if upgrade == b"websocket" else b""
    return b"POST /x HTTP/1.1\r\nHost: t\r\nUpgrade: %s\r\n%s%sContent-Length: %d\r\n\r\n%s" % (
        upgrade,
        connection,
        extra,
        len(body),
        body,
    )


@pytest.mark.parametrize("upgrade", [b"x", b"h2c", b"websocket"])
async def test_the_body_of_an_upgrade_request_is_never_parsed_as_a_request(
    upstreams: tuple[RawUpstream, RawUpstream], proxy_factory: ProxyFactory, upgrade: bytes, connect: Connect
) -> None:
    """The smuggled request names ``X-Canary: always``: parsed as a request, it would even go
    to another backend than the one that got the request it hides in."""
    stable, canary = upstreams
    proxy = await proxy_factory(proxy_config(stable, canary))
    client = await connect(proxy)
    await client.send(upgrade_with_body(upgrade, SMUGGLED))
    first = await client.read(count=1, timeout=3)
    if upgrade == b"websocket":
        assert [r.status for r in first.final] == [400], first
        assert await client.closed()
        await client.close()
        await nothing_reached(proxy, stable, canary)
        return
    await client.send(b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n")  # a sentinel on the same connection
    rest = await client.read(until="/after", timeout=4)
    await client.close()
    assert not canary.connections, f"a request smuggled in a body reached the canary\n{canary.describe()}"
    responses = [(r.status, r.target) for r in first.final + rest.final]
    assert "/smuggled" not in stable.targets(), stable.describe()
    assert responses == [(200, "/x"), (200, "/after")], f"one response per request expected: {responses}"
    posted = own_request(stable, "/x")
    assert posted.complete and posted.body == SMUGGLED, posted
    assert posted.header("Upgrade") is None
    await assert_framed(stable, canary)


async def test_a_plain_request_with_a_body_like_a_request_is_relayed_as_body_bytes(
    upstreams: tuple[RawUpstream, RawUpstream], proxy_factory: ProxyFactory, connect: Connect
) -> None:
    """The control: without Upgrade, the same body is body bytes (passes today)."""
    stable, canary = upstreams
    proxy = await proxy_factory(proxy_config(stable, canary))
    client = await connect(proxy)
    await client.send(
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED)
    )
    read = await client.read(count=1)
    await client.close()
    assert [(r.status, r.target) for r in read.final] == [(200, "/x")]
    assert (await stable.wait_target("/x")).body == SMUGGLED
    assert not canary.connections
    await assert_framed(stable, canary)


# -- finding 3: the retry after a stale pooled connection loses the body ------------------


@pytest.mark.parametrize("size", [1000, 200_000], ids=["1000B", "200KB"])
@pytest.mark.parametrize("method", [b"PUT", b"DELETE"])
async def test_a_retry_on_a_fresh_connection_sends_the_whole_body_or_answers_502(
    raw_upstreams: UpstreamFactory, proxy_factory: ProxyFactory, method: bytes, size: int, connect: Connect
) -> None:
    """Every upstream connection goes stale after one request: the next byte on it meets a
    reset, as on a pooled connection the upstream closed while idle."""
    stable = await raw_upstreams("stable", stale_after=1)
    canary = await raw_upstreams("canary")
    proxy = await proxy_factory(proxy_config(stable, canary))
    client = await connect(proxy)
    await client.send(b"GET /warm HTTP/1.1\r\nHost: t\r\n\r\n")  # leaves a pooled connection
    warm = await client.read(count=1)
    assert [r.status for r in warm.final] == [200], warm
    body = bytes(i % 251 for i in range(size))
    await client.send(b"%s /data HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (method, size, body))
    answer = await client.read(count=1)
    assert [r.status for r in answer.final] in ([200], [502]), answer
    assert stable.connections[0].reset, f"the pooled connection was not reused\n{stable.describe()}"

    retried = [r for c in stable.connections if not c.reset for r in c.requests if r.target == "/data"]
    if answer.final[0].status == 200:
        assert len(retried) == 1, stable.describe()
        assert retried[0].length == size, retried[0]
        await stable.wait(
            lambda: retried[0].complete or stable.connections[retried[0].conn].closed,
            timeout=3,
            what=f"the {size} B body of the retried request",
        )
        assert retried[0].complete and retried[0].body == body, (
            f"the retry reached the upstream without its body: {retried[0]}\n{stable.describe()}"
        )
    else:
        assert not [r for r in retried if not r.complete], f"a retry without its body\n{stable.describe()}"
    if not client.eof:
        await client.send(b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
        after = await client.read(until="/next", timeout=4)
        assert after.ended in ("stop", "eof"), after
    await client.close()
    await assert_framed(stable, canary)


# -- finding 4: an unrequested 101 -------------------------------------------------------

INJECTED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Injected: yes\r\n\r\ninjected"


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "one-by-one"])
async def test_an_unrequested_101_is_a_502_and_what_follows_it_never_reaches_the_client(
    raw_upstreams: UpstreamFactory, proxy_factory: ProxyFactory, pipelined: bool, connect: Connect
) -> None:
    stable = await raw_upstreams("stable", upgrade_with={"/plain": INJECTED})
    canary = await raw_upstreams("canary")
    proxy = await proxy_factory(proxy_config(stable, canary))
    client = await connect(proxy)
    plain, following = b"GET /plain HTTP/1.1\r\nHost: t\r\n\r\n", b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n"
    if pipelined:
        await client.send(plain + following)
        read = await client.read(until="/next", timeout=5)
    else:
        await client.send(plain)
        read = await client.read(count=1, timeout=5)
        if read.ended == "stop" and not client.eof:
            await client.send(following)
            more = await client.read(until="/next", timeout=5)
            read = Read(read.responses + more.responses, more.ended, more.raw)
    await client.close()
    assert b"injected" not in read.raw, (
        f"bytes sent after an unrequested 101 reached the client: {read.raw!r}"
    )
    assert read.responses and read.responses[0].status == 502, read
    assert read.ended != "timeout", f"the client connection hangs after the 502: {read}"
    if read.ended == "stop":
        assert [(r.status, r.target) for r in read.final[1:]] == [(200, "/next")], read


# -- finding 5: Host ---------------------------------------------------------------------

BAD_HOSTS = {
    "missing": b"GET / HTTP/1.1\r\n\r\n",
    "two": b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
    "path-and-query": b"GET / HTTP/1.1\r\nHost: a.example/evil?x=1\r\n\r\n",
    "space": b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    "userinfo": b"GET / HTTP/1.1\r\nHost: user@a.example\r\n\r\n",
    "bad-port": b"GET / HTTP/1.1\r\nHost: a.example:80x\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", list(BAD_HOSTS.values()), ids=list(BAD_HOSTS))
async def test_a_missing_duplicate_or_malformed_host_is_400_and_reaches_no_upstream(
    upstreams: tuple[RawUpstream, RawUpstream], proxy_factory: ProxyFactory, request_bytes: bytes
) -> None:
    stable, canary = upstreams
    proxy = await proxy_factory(proxy_config(stable, canary))
    read = await exchange(proxy, request_bytes)
    assert [r.status for r in read.final] == [400], f"{read}\n{stable.describe()}"
    await nothing_reached(proxy, stable, canary)


@pytest.mark.parametrize(
    ("request_bytes", "host"),
    [
        (b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n", "shop.example"),
        (b"GET / HTTP/1.1\r\nHost: shop.example:8080\r\n\r\n", "shop.example:8080"),
        (b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", "[::1]:8080"),
        (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "127.0.0.1"),
        (b"GET / HTTP/1.0\r\n\r\n", None),  # HTTP/1.0 needs no Host
    ],
)
async def test_a_valid_host_is_forwarded_as_is(
    upstreams: tuple[RawUpstream, RawUpstream],
    proxy_factory: ProxyFactory,
    request_bytes: bytes,
    host: str | None,
) -> None:
    stable, canary = upstreams
    proxy = await proxy_factory(proxy_config(stable, canary))
    read = await exchange(proxy, request_bytes)
    assert [r.status for r in read.final] == [200], read
    request = own_request(stable, "/")
    if host is not None:
        assert request.values("Host") == [host]
        assert request.values("X-Forwarded-Host") == [host]


# -- finding 6: framing and request-line validation ----------------------------------------

REJECTED = {
    "two-transfer-encodings": (
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        400,
    ),
    "transfer-encoding-on-http-1.0": (
        b"POST / HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    "http-0.9": (b"GET /\r\n\r\n", 400),
    "http-2.0-request-line": (b"GET / HTTP/2.0\r\nHost: t\r\n\r\n", 505),
}


@pytest.mark.parametrize(("request_bytes", "status"), list(REJECTED.values()), ids=list(REJECTED))
async def test_ambiguous_framing_and_unsupported_versions_are_rejected_before_any_upstream(
    upstreams: tuple[RawUpstream, RawUpstream], proxy_factory: ProxyFactory, request_bytes: bytes, status: int
) -> None:
    stable, canary = upstreams
    proxy = await proxy_factory(proxy_config(stable, canary))
    read = await exchange(proxy, request_bytes)
    assert read.final and read.final[0].status == status, f"{read}\n{stable.describe()}"
    assert read.raw.startswith(b"HTTP/1.1 %d " % status), read.raw[:100]
    await nothing_reached(proxy, stable, canary)


async def test_options_asterisk_is_forwarded_as_asterisk(
    upstreams: tuple[RawUpstream, RawUpstream], proxy_factory: ProxyFactory
) -> None:
    stable, canary = upstreams
    proxy = await proxy_factory(proxy_config(stable, canary))
    read = await exchange(proxy, b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n")
    assert [r.status for r in read.final] == [200], read
    assert [(r.method, r.target) for r in stable.requests] == [("OPTIONS", "*")], stable.describe()


UNDERSCORED = b"X_Forwarded_For: 6.6.6.6\r\nContent_Length: 5\r\nX_Custom: 1\r\nX-Custom-Ok: 1\r\n"


async def test_headers_with_underscores_are_dropped_by_default(
    upstreams: tuple[RawUpstream, RawUpstream], proxy_factory: ProxyFactory
) -> None:
    stable, canary = upstreams
    proxy = await proxy_factory(proxy_config(stable, canary))
    read = await exchange(proxy, b"GET / HTTP/1.1\r\nHost: t\r\n" + UNDERSCORED + b"\r\n")
    assert [r.status for r in read.final] == [200], read
    request = own_request(stable, "/")
    assert not {n for n in request.names() if "_" in n}, request.headers
    assert request.values("X-Custom-Ok") == ["1"]


@pytest.mark.parametrize("how", ["flag", "env"])
async def test_underscores_in_headers_on_forwards_them(
    upstreams: tuple[RawUpstream, RawUpstream], proxy_factory: ProxyFactory, how: str
) -> None:
    stable, canary = upstreams
    if how == "flag":
        proxy = await proxy_factory(proxy_config(stable, canary), "--underscores-in-headers", "on")
    else:
        env = {"CANARY_PROXY_UNDERSCORES_IN_HEADERS": "on"}
        proxy = await proxy_factory(proxy_config(stable, canary), env=env)
    read = await exchange(proxy, b"GET / HTTP/1.1\r\nHost: t\r\n" + UNDERSCORED + b"\r\n")
    assert [r.status for r in read.final] == [200], read
    request = own_request(stable, "/")
    assert request.values("X_Custom") == ["1"]
    assert request.values("Content_Length") == ["5"]
    assert request.values("X_Forwarded_For") == ["6.6.6.6"]
    assert request.framing == "none"  # Content_Length is no Content-Length


# -- forwarded headers -------------------------------------------------------------------

SPOOFED = (
    b"GET / HTTP/1.1\r\nHost: shop.example\r\nX-Forwarded-For: 203.0.113.7\r\n"
    b"X-Forwarded-Host: evil.example\r\nX-Real-IP: 203.0.113.8\r\n"
    b"Forwarded: for=203.0.113.9;host=evil.example\r\n\r\n"
)


def assert_replaced(request: RawRequest) -> None:
    assert request.values("X-Forwarded-Host") == ["shop.example"], request.headers
    assert request.values("X-Real-IP") == ["127.0.0.1"], request.headers
    assert request.values("X-Forwarded-Proto") == ["http"], request.headers
    forwarded = " ".join(request.values("Forwarded"))
    assert "203.0.113" not in forwarded and "evil" not in forwarded, request.headers


async def test_client_forwarded_headers_are_replaced_by_what_the_proxy_saw(
    upstreams: tuple[RawUpstream, RawUpstream], proxy_factory: ProxyFactory
) -> None:
    stable, canary = upstreams
    proxy = await proxy_factory(proxy_config(stable, canary))
    read = await exchange(proxy, SPOOFED)
    assert [r.status for r in read.final] == [200], read
    request = own_request(stable, "/")
    assert request.values("X-Forwarded-For") == ["127.0.0.1"], request.headers
    assert_replaced(request)


@pytest.mark.parametrize("how", ["flag", "env"])
async def test_trusted_peers_keep_the_clients_x_forwarded_for(
    upstreams: tuple[RawUpstream, RawUpstream], proxy_factory: ProxyFactory, how: str
) -> None:
    stable, canary = upstreams
    if how == "flag":
        proxy = await proxy_factory(proxy_config(stable, canary), "--trust-forwarded-from", "127.0.0.0/8")
    else:
        env = {"CANARY_PROXY_TRUST_FORWARDED_FROM": "127.0.0.0/8"}
        proxy = await proxy_factory(proxy_config(stable, canary), env=env)
    read = await exchange(proxy, SPOOFED)
    assert [r.status for r in read.final] == [200], read
    request = own_request(stable, "/")
    assert request.values("X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"], request.headers


async def test_an_untrusted_peer_gets_its_x_forwarded_for_replaced(
    upstreams: tuple[RawUpstream, RawUpstream], proxy_factory: ProxyFactory
) -> None:
    stable, canary = upstreams
    proxy = await proxy_factory(proxy_config(stable, canary), "--trust-forwarded-from", "10.0.0.0/8")
    read = await exchange(proxy, SPOOFED)
    assert [r.status for r in read.final] == [200], read
    request = own_request(stable, "/")
    assert request.values("X-Forwarded-For") == ["127.0.0.1"], request.headers
    assert_replaced(request)


# -- rejected requests are counted and logged ----------------------------------------------

PARSER_REJECTS = {
    400: b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
    431: b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n",
    505: b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
}


def rejected_count(scrape: Scrape, code: int) -> float:
    """canary_proxy_requests_total{version="none", code=...}, whatever the method label."""
    return sum(
        value
        for labels, value in scrape.series("canary_proxy_requests_total").items()
        if dict(labels).get("version") == "none" and dict(labels).get("code") == str(code)
    )


async def test_requests_the_parser_rejects_are_counted_and_logged(
    upstreams: tuple[RawUpstream, RawUpstream], proxy_factory: ProxyFactory
) -> None:
    stable, canary = upstreams
    proxy = await proxy_factory(proxy_config(stable, canary))
    statuses = {}
    for status, request_bytes in PARSER_REJECTS.items():
        read = await exchange(proxy, request_bytes)
        statuses[status] = read.final[0].status if read.final else None
    m = await wait_metric(
        proxy,
        lambda s: all(rejected_count(s, code) >= 1 for code in PARSER_REJECTS),
        what=f'canary_proxy_requests_total{{version="none"}} for 400, 431 and 505 (answered {statuses})',
    )
    assert {code: rejected_count(m, code) for code in PARSER_REJECTS} == dict.fromkeys(PARSER_REJECTS, 1.0)
    await eventually(
        lambda: {e.get("status") for e in proxy.access} >= set(PARSER_REJECTS),
        what=f"access log lines for 400, 431 and 505: {json.dumps(proxy.access)[:2000]}",
    )
    for entry in proxy.access:
        if entry.get("status") in PARSER_REJECTS:
            assert entry["version"] not in ("stable", "canary"), entry
            assert entry["client"] == "127.0.0.1", entry
    assert statuses == {code: code for code in PARSER_REJECTS}
    assert not stable.connections and not canary.connections


# -- found by test_differential ------------------------------------------------------------


async def test_the_proxys_own_error_answer_to_head_has_no_body(
    raw_upstreams: UpstreamFactory, proxy_factory: ProxyFactory, connect: Connect
) -> None:
    """A 502 (or any error page of the proxy's) to a HEAD request must not carry the body its
    Content-Length describes: the client reads those bytes as the next response."""
    stable = await raw_upstreams("stable")
    canary = await raw_upstreams("canary")

    def reset_heads(request: RawRequest, conn: RawConnection) -> Answer:
        if request.method == "HEAD":
            return Answer(after="reset")  # on a fresh connection: no retry, a 502
        return Answer(stable.response(request, conn))

    stable.responder = reset_heads
    proxy = await proxy_factory(proxy_config(stable, canary))
    client = await connect(proxy)
    await client.send(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\nGET /next HTTP/1.1\r\nHost: t\r\n\r\n")
    read = await client.read(until="/next", heads=1)
    await client.close()
    assert [(r.status, r.target) for r in read.final] == [(502, None), (200, "/next")], (read, read.raw)


@pytest.mark.parametrize(
    "malformed",
    [b"GARBAGE\r\n\r\n", b"GET /3 HTTP/1.1\r\nHost: t\r\nBad Header: y\r\n\r\n"],
    ids=["garbage", "bad-header"],
)
async def test_requests_pipelined_before_a_malformed_one_are_answered_first_in_order(
    upstreams: tuple[RawUpstream, RawUpstream],
    proxy_factory: ProxyFactory,
    malformed: bytes,
    connect: Connect,
) -> None:
    """The 400 is the answer to the malformed request, after the answers to those before it:
    never in the place of a valid request that was then dropped."""
    stable, canary = upstreams
    proxy = await proxy_factory(proxy_config(stable, canary))
    client = await connect(proxy)
    await client.send(b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\nGET /2 HTTP/1.1\r\nHost: t\r\n\r\n" + malformed)
    read = await client.read(count=3)
    await client.close()
    assert [(r.status, r.target) for r in read.final] == [(200, "/1"), (200, "/2"), (400, None)], read
    assert stable.targets() == ["/1", "/2"], stable.describe()
