"""A raw-socket test upstream that records exactly what each connection received.

Like Node's http server answering a 404 or a redirect, it answers each request as soon as its
head arrives, *before* reading the body; then it reads the body its head announced
(Content-Length or chunked) and goes on with the next request on the same connection. A
proxy that forwards a head announcing more body than it sends, or that sends bytes beyond
what it announced, desynchronizes such a connection: what the upstream took for one request
shows here byte for byte, per connection, with the requests parsed out of it.

Scripted behaviour, per upstream: the status and body of the answers; ``close_after`` (a FIN
once that many requests were answered and read, with no ``Connection: close``);
``stale_after`` (after that many, the connection looks open but the next byte the proxy
sends is answered with a TCP RST, as by an upstream that had closed it while idle: a stale
pooled connection, deterministically); ``upgrade_with`` (to a request for one of its
targets, a ``101`` the request never asked for, followed by the given bytes); or a
``responder`` that decides each answer.

The head parser is hand-written on purpose: strict enough to frame what a proxy sends
(request line, ``name: value`` fields, CRLF), and independent of the proxy's llhttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import pytest

MAX_HEAD = 64 << 10
REASONS = {101: "Switching Protocols", 200: "OK", 400: "Bad Request", 404: "Not Found"}

After = Literal["keep", "close", "reset", "upgrade"]


@dataclass
class RawRequest:
    """One request as the upstream framed it. ``raw`` is its exact bytes on the wire."""

    conn: int  # index of the connection it came on
    seq: int  # arrival order across all connections of this upstream
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    framing: Literal["none", "length", "chunked"] = "none"
    length: int = 0  # what Content-Length announced
    body: bytes = b""  # decoded (chunked: the chunk data only)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    raw: bytes = b""
    complete: bool = False  # its whole body arrived

    def values(self, name: str) -> list[str]:
        low = name.lower()
        return [v for n, v in self.headers if n.lower() == low]

    def header(self, name: str) -> str | None:
        found = self.values(name)
        return found[-1] if found else None

    def names(self) -> set[str]:
        return {n.lower() for n, _ in self.headers}

    def __str__(self) -> str:
        state = "complete" if self.complete else "INCOMPLETE"
        return f"{self.method} {self.target} ({self.framing} {self.length}, body {len(self.body)} B, {state})"


@dataclass
class RawConnection:
    index: int
    raw: bytearray = field(default_factory=bytearray)
    requests: list[RawRequest] = field(default_factory=list)
    consumed: int = 0  # bytes of ``raw`` that belong to complete requests (or to a 101'd exchange)
    error: str | None = None  # bytes that are not a well-formed request
    eof: bool = False  # the peer (the proxy) closed its side
    closed: bool = False  # the connection is over (either side)
    reset: bool = False  # we reset it (``stale_after`` or a ``reset`` answer)
    upgraded: bool = False  # we answered 101: what followed is no HTTP
    answered: int = 0

    @property
    def tail(self) -> bytes:
        """Received bytes that belong to no complete request."""
        return bytes(self.raw[self.consumed :])

    def describe(self) -> str:
        flags = [f for f, on in (("eof", self.eof), ("reset", self.reset), ("upgraded", self.upgraded)) if on]
        lines = [f"connection {self.index} [{', '.join(flags) or 'open'}], {len(self.raw)} bytes:"]
        lines += [f"  {r}" for r in self.requests]
        if self.error:
            lines.append(f"  error: {self.error}")
        if self.tail:
            lines.append(f"  unframed tail: {self.tail[:300]!r}")
        return "\n".join(lines)


@dataclass
class Answer:
    """What to send for a request (``data``), and what to do next: ``keep`` (read its body,
    then the next request), ``close`` (read its body, then FIN), ``reset`` (RST now, without
    sending ``data``) or ``upgrade`` (send ``data``, then read raw bytes until EOF)."""

    data: bytes = b""
    after: After = "keep"


Responder = Callable[[RawRequest, RawConnection], Answer]


class BadRequest(Exception):
    pass


class _Reader:
    """Buffered reads off one connection; every byte received is appended to ``conn.raw``."""

    def __init__(self, upstream: RawUpstream, reader: asyncio.StreamReader, conn: RawConnection) -> None:
        self.upstream = upstream
        self.reader = reader
        self.conn = conn
        self.pos = 0  # parse position in conn.raw

    async def more(self) -> bool:
        data = await self.reader.read(65536)
        if not data:
            self.conn.eof = True
            self.upstream.changed()
            return False
        self.conn.raw += data
        self.upstream.changed()
        return True

    @property
    def buffered(self) -> int:
        return len(self.conn.raw) - self.pos

    async def until(self, sep: bytes, limit: int) -> bytes | None:
        """Up to and including ``sep``; None at EOF first."""
        while True:
            end = self.conn.raw.find(sep, self.pos)
            if end >= 0:
                data = bytes(self.conn.raw[self.pos : end + len(sep)])
                self.pos = end + len(sep)
                return data
            if self.buffered > limit:
                raise BadRequest(f"no {sep!r} within {limit} bytes")
            if not await self.more():
                return None

    async def exactly(self, n: int) -> bytes | None:
        while self.buffered < n:
            if not await self.more():
                return None
        data = bytes(self.conn.raw[self.pos : self.pos + n])
        self.pos += n
        return data


def parse_head(head: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise BadRequest(f"bad request line {lines[0][:200]!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b"\r" in line or b"\n" in line:
            raise BadRequest(f"bad header line {line[:200]!r}")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    method, target, version = (p.decode("latin-1") for p in parts)
    return method, target, version, headers


def framing_of(request: RawRequest) -> None:
    te = request.values("transfer-encoding")
    lengths = request.values("content-length")
    if te:
        if lengths:
            raise BadRequest("both Transfer-Encoding and Content-Length")
        codings = [c.strip().lower() for v in te for c in v.split(",")]
        if codings[-1] != "chunked":
            raise BadRequest(f"transfer codings {codings}")
        request.framing = "chunked"
    elif lengths:
        if len(set(lengths)) != 1 or not lengths[0].isdigit():
            raise BadRequest(f"Content-Length {lengths}")
        request.framing = "length"
        request.length = int(lengths[0])


class RawUpstream:
    def __init__(
        self,
        name: str = "raw",
        *,
        status: int = 200,
        body: bytes | None = None,
        close_after: int | None = None,
        stale_after: int | None = None,
        upgrade_with: dict[str, bytes] | None = None,
        responder: Responder | None = None,
    ) -> None:
        self.name = name
        self.status = status
        self.body = body
        self.close_after = close_after
        self.stale_after = stale_after
        self.upgrade_with = upgrade_with or {}
        self.responder = responder
        self.connections: list[RawConnection] = []
        self.url = ""
        self.port = 0
        self._seq = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._changed = asyncio.Event()

    # -- what was received ----------------------------------------------------------------

    @property
    def requests(self) -> list[RawRequest]:
        """Every request (complete or not) in arrival order."""
        return sorted((r for c in self.connections for r in c.requests), key=lambda r: r.seq)

    def targets(self) -> list[str]:
        return [r.target for r in self.requests]

    def describe(self) -> str:
        if not self.connections:
            return f"upstream {self.name}: no connection"
        return f"upstream {self.name}:\n" + "\n".join(c.describe() for c in self.connections)

    def changed(self) -> None:
        self._changed.set()

    async def wait(self, check: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
        """Until ``check()`` holds, woken by each byte received or connection change."""

        async def scan() -> None:
            while not check():
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(scan(), timeout)
        except TimeoutError:
            raise AssertionError(f"{what or 'condition'} not met in {timeout}s\n{self.describe()}") from None

    async def wait_target(self, target: str, timeout: float = 5.0) -> RawRequest:
        """The first request for ``target`` once its body is in (or its connection ended)."""

        def found() -> RawRequest | None:
            for c in self.connections:
                for r in c.requests:
                    if r.target == target and (r.complete or c.closed):
                        return r
            return None

        await self.wait(lambda: found() is not None, timeout, f"a request for {target}")
        request = found()
        assert request is not None
        return request

    async def settled(self, timeout: float = 5.0) -> None:
        """Every connection is between requests or over: nothing is in the middle of arriving."""
        await self.wait(
            lambda: all(c.closed or c.upgraded or (not c.tail and c.error is None) for c in self.connections),
            timeout,
            "every upstream connection between requests",
        )

    # -- running ------------------------------------------------------------------------

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = RawConnection(len(self.connections))
        self.connections.append(conn)
        self._writers.add(writer)
        feed = _Reader(self, reader, conn)
        try:
            await self._requests(feed, writer)
        except BadRequest as exc:
            conn.error = str(exc)
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except (ConnectionError, OSError):
            pass  # the proxy reset it: what arrived is recorded
        finally:
            conn.closed = True
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.transport.close()
            self.changed()

    async def _requests(self, feed: _Reader, writer: asyncio.StreamWriter) -> None:
        conn = feed.conn
        while True:
            if self.stale_after is not None and conn.answered >= self.stale_after:
                if feed.buffered or await feed.more():
                    reset(writer)  # closed while idle: the kernel answers the next write with RST
                    conn.reset = True
                return
            head = await feed.until(b"\r\n\r\n", MAX_HEAD)
            if head is None:
                return
            start = feed.pos - len(head)
            method, target, version, headers = parse_head(head)
            self._seq += 1
            request = RawRequest(conn.index, self._seq, method, target, version, headers, raw=head)
            conn.requests.append(request)
            framing_of(request)
            self.changed()
            answer = self._answer(request, conn)
            if answer.after == "reset":
                reset(writer)
                conn.reset = True
                return
            writer.write(answer.data)
            conn.answered += 1
            if answer.after == "upgrade":
                conn.upgraded = True
                conn.consumed = feed.pos
                while await feed.more():
                    pass
                return
            if not await self._body(feed, request):
                request.raw = bytes(conn.raw[start:])
                return  # EOF mid-body: the request stays incomplete
            request.raw = bytes(conn.raw[start : feed.pos])
            request.complete = True
            conn.consumed = feed.pos
            self.changed()
            if answer.after == "close" or (
                self.close_after is not None and conn.answered >= self.close_after
            ):
                writer.close()
                return

    async def _body(self, feed: _Reader, request: RawRequest) -> bool:
        if request.framing == "length":
            data = await feed.exactly(request.length)
            if data is None:
                request.body = bytes(feed.conn.raw[feed.pos :])
                return False
            request.body = data
            return True
        if request.framing != "chunked":
            return True
        body = bytearray()
        while True:
            line = await feed.until(b"\r\n", 4096)
            if line is None:
                request.body = bytes(body)
                return False
            size_text = line[:-2].split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadRequest(f"bad chunk size line {line[:100]!r}") from None
            if size == 0:
                break
            chunk = await feed.exactly(size + 2)
            if chunk is None:
                request.body = bytes(body + feed.conn.raw[feed.pos :])
                return False
            if not chunk.endswith(b"\r\n"):
                raise BadRequest("chunk data not followed by CRLF")
            body += chunk[:-2]
            request.body = bytes(body)
        request.body = bytes(body)
        while True:  # trailers, up to the empty line
            line = await feed.until(b"\r\n", 4096)
            if line is None:
                return False
            if line == b"\r\n":
                return True
            name, sep, value = line[:-2].partition(b":")
            if not sep:
                raise BadRequest(f"bad trailer {line[:100]!r}")
            request.trailers.append((name.decode("latin-1"), value.strip().decode("latin-1")))

    def _answer(self, request: RawRequest, conn: RawConnection) -> Answer:
        if self.responder is not None:
            return self.responder(request, conn)
        if request.target in self.upgrade_with:
            head = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x-test\r\n\r\n"
            return Answer(head + self.upgrade_with[request.target], "upgrade")
        return Answer(self.response(request, conn))

    def response(self, request: RawRequest, conn: RawConnection, *, status: int | None = None) -> bytes:
        """A Content-Length response that says which request (and connection) it answers."""
        status = self.status if status is None else status
        body = self.body if self.body is not None else f"{request.method} {request.target}\n".encode()
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Whatever')}\r\nContent-Length: {len(body)}\r\n"
            f"X-Target: {request.target}\r\nX-Conn: {conn.index}\r\nX-Seq: {request.seq}\r\n"
            f"X-Upstream: {self.name}\r\n\r\n"
        ).encode("latin-1")
        return head if request.method == "HEAD" else head + body


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def framing_violations(*upstreams: RawUpstream) -> list[str]:
    """The invariant every upstream connection must keep: what it received is a sequence of
    exactly framed requests, and at most one last request cut short, after which the proxy
    closed the connection (nothing follows a broken exchange). Call once settled."""
    problems = []
    for upstream in upstreams:
        for conn in upstream.connections:
            where = f"{upstream.name} connection {conn.index}"
            if conn.error is not None:
                problems.append(f"{where}: bytes that are no well-formed request ({conn.error})")
            if conn.reset or conn.upgraded:
                continue  # we ended it ourselves: what arrived after that point was never read
            cut = [r for r in conn.requests if not r.complete]
            if cut and not conn.eof:
                problems.append(f"{where}: {cut[-1]} is still waiting for its body on an open connection")
            if cut and cut[-1] is not conn.requests[-1]:
                problems.append(f"{where}: requests follow the incomplete {cut[0]}")
    return problems


UpstreamFactory = Callable[..., Awaitable[RawUpstream]]


@pytest.fixture
async def raw_upstreams() -> AsyncIterator[UpstreamFactory]:
    """``await raw_upstreams(name, **options)``: a started RawUpstream on 127.0.0.1:0; all
    of them are stopped when the test ends."""
    started: list[RawUpstream] = []

    async def factory(name: str = "raw", **options: object) -> RawUpstream:
        upstream = await RawUpstream(name, **options).start()  # type: ignore[arg-type]
        started.append(upstream)
        return upstream

    yield factory
    for upstream in started:
        await upstream.stop()


@pytest.fixture
async def raw_upstream(raw_upstreams: UpstreamFactory) -> RawUpstream:
    """One default RawUpstream: answers 200 with ``METHOD TARGET`` at once, keep-alive."""
    return await raw_upstreams("stable")
