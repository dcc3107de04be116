"""Upstream connections: one keep-alive pool per upstream URL, and the protocol that parses
each response with httptools (llhttp, the C parser) and hands it to the request in flight.

The pool is a LIFO of idle connections: the most recently used one is the least likely to
have been closed by the upstream's idle timeout. A connection the upstream closed while idle
is noticed (``connection_lost``) and skipped.

How a broken response is classified (the ``reason`` of ``upstream_errors_total``): a connection
reset (RST, or any socket error) is ``reset``; a clean close (FIN) before any byte of the
response is ``reset`` too (a keep-alive connection the upstream closed: retried when safe);
a clean close after part of the response, before its framing says it is complete (a body
shorter than its Content-Length, an unfinished chunked body or head), is ``protocol``, as is
anything malformed and any byte that arrives when no response is expected (a body longer than
its Content-Length): those bytes are never taken as the next request's response, because the
connection is closed at once.

Reuse is decided in one place, ``reuse_refusal``: a connection goes back to the pool only if
the request body written is exactly what the forwarded head announced, the response was read to
its framed end, and no upgrade was asked for or happened. Every path (relay, retry, mirror,
error) hands a connection back through ``UpstreamPool.release``, which asks it; nothing else
puts a connection in the pool.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

import httptools

from ..config import Upstream

log = logging.getLogger(__name__)

# Methods a stale pooled connection may be retried for (RFC 9110 9.2.2), by the proxy and the mirror.
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
CHUNKED: Final = -1  # ``start``'s framing for a chunked request body
IDLE_TIMEOUT = 15.0  # seconds; below common upstream keep-alive timeouts (nginx 75 s, node 5 s -> retried)
MAX_IDLE = 512  # idle connections kept per upstream


class ConnectFailed(Exception):
    """The TCP (or TLS) connection could not be made: refused, unreachable or timed out."""

    def __init__(self, detail: str, *, timeout: bool = False) -> None:
        super().__init__(detail)
        self.timeout = timeout


class ResponseSink(Protocol):
    """What an upstream connection reports to the request it serves."""

    def on_response_head(self, conn: UpstreamConnection) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_complete(self) -> None: ...
    def on_upstream_upgraded(self, rest: bytes) -> None: ...
    def on_upstream_raw(self, data: bytes) -> None: ...
    def on_upstream_error(self, reason: str, detail: str) -> None: ...
    def on_upstream_writable(self, writable: bool) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream; serves one request at a time."""

    __slots__ = (
        "_writable",
        "body_left",
        "closed",
        "expect_upgrade",
        "got_bytes",
        "headers",
        "idle_since",
        "keep_alive",
        "out",
        "overrun",
        "parser",
        "pool",
        "reason",
        "request_left",
        "response_done",
        "route",
        "sink",
        "status",
        "transport",
        "until_close",
        "upgraded",
        "version",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.upgraded = False
        self.got_bytes = False  # any response byte for the current request
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.idle_since = 0.0
        self.version = ""  # the version label of the request last served, for stray bytes
        self.route = ""  # and its route label
        self.out: list[bytes] = []  # held by ``hold`` until ``flush``
        self.body_left = -1  # Content-Length bytes still to come; -1: not a length-framed body
        self.keep_alive = False  # the response head allows another request on this connection
        self.until_close = False  # the response head has no framing: the close ends its body
        # The request side's framing, for ``reuse_refusal``: body bytes the head announced and
        # not yet written (CHUNKED until the last chunk went out), and whether more was offered.
        self.request_left = 0
        self.overrun = False
        self.expect_upgrade = False  # the request asked for an upgrade (a WebSocket handshake)
        self.response_done = False  # the response was read to its framed end
        self._writable = True

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:  # bytes with no request in flight: the connection is not reusable
            self._stray(f"{len(data)} bytes while no response was expected")
            return
        self.got_bytes = True
        if self.upgraded:
            sink.on_upstream_raw(data)
            return
        if self.body_left > 0 and self.status:
            self._relay_body(sink, data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self.closed or self.sink is not sink:  # a 101 we did not ask for: already failed
                return
            self.upgraded = True
            sink.on_upstream_upgraded(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            if self.sink is None:  # the response was complete: what followed it is stray
                self._stray(f"bytes after the end of the response ({exc})")
                return
            self.close()
            sink.on_upstream_error("protocol", f"malformed response: {exc}")

    def _relay_body(self, sink: ResponseSink, data: bytes) -> None:
        """The rest of a Content-Length body, relayed as it was read. Past its first read the
        parser is skipped: it would copy every body byte into a new object on the way (a
        tenth of the CPU of a 1 MiB response), and a length needs no parsing."""
        left = self.body_left
        if len(data) <= left:
            self.body_left = left - len(data)
            sink.on_response_body(data)
        else:
            self.body_left = 0
            sink.on_response_body(data[:left])
        if self.body_left == 0:
            self.restart_parser()
            self.on_message_complete()
            if len(data) > left:
                self._stray(f"{len(data) - left} bytes after the end of the response")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        sink, self.sink = self.sink, None
        if sink is None:
            return
        if self.upgraded:
            sink.on_upstream_error("closed", "upstream closed the upgraded connection")
        elif self.status and not self.keep_alive and self.until_close:
            sink.on_response_complete()  # a body delimited by the close itself
        elif exc is None and self.got_bytes:
            sink.on_upstream_error(
                "protocol", "upstream closed the connection before the response was complete"
            )
        else:
            sink.on_upstream_error("reset", f"upstream closed the connection ({exc or 'EOF'})")

    def pause_writing(self) -> None:
        self._writable = False
        if self.sink is not None:
            self.sink.on_upstream_writable(False)

    def resume_writing(self) -> None:
        self._writable = True
        if self.sink is not None:
            self.sink.on_upstream_writable(True)

    def _stray(self, detail: str) -> None:
        """Bytes the upstream sent when no response was expected: close, and report it once."""
        if self.closed:
            return
        self.close()
        if self.pool.on_stray is not None:
            self.pool.on_stray(self, detail)

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.sink is None:  # a second response in the same read: never for the next request
            self._stray("a response nobody asked for")

    def on_status(self, status: bytes) -> None:
        self.reason = status

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.status:  # trailers after a chunked body are dropped
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.sink is None:  # a second response nobody asked for: never reuse this connection
            self.close()
            return
        code = self.parser.get_status_code()
        if 100 <= code < 200 and code != 101:
            self.headers = []  # 100 Continue and other interim answers are not relayed
            self.reason = b""
            return
        if code == 101 and not self.expect_upgrade:
            # Whatever follows a 101 is another protocol: none of it may reach the client.
            sink, self.sink = self.sink, None
            self.abort()
            sink.on_upstream_error("protocol", "unexpected 101 from upstream (no upgrade was asked for)")
            return
        self.status = code
        self.keep_alive = self.parser.should_keep_alive()
        length, self.until_close = _framing(self.headers)
        self.body_left = length if code not in (101, 204, 304) else -1
        self.sink.on_response_head(self)

    def on_body(self, body: bytes) -> None:
        if self.body_left > 0:
            self.body_left -= len(body)
        if self.sink is not None:
            self.sink.on_response_body(body)

    def on_message_complete(self) -> None:
        if self.status and self.status != 101 and self.sink is not None:  # 101: raw bytes follow
            self.response_done = True
            sink, self.sink = self.sink, None
            sink.on_response_complete()

    # -- use --------------------------------------------------------------------------------

    def start(self, sink: ResponseSink, framing: int, upgrade: bool = False) -> None:
        """Serve one request: its head announces ``framing`` (a Content-Length, CHUNKED, or 0
        for no body); ``upgrade`` if it asks to switch protocols (a 101 is expected)."""
        self.sink = sink
        self.status = 0
        self.reason = b""
        self.headers = []
        self.got_bytes = False
        self.body_left = -1
        self.until_close = False
        self.request_left = framing
        self.overrun = False
        self.expect_upgrade = upgrade
        self.response_done = False

    def write_body(self, data: bytes) -> None:
        """A piece of the request body, framed as the head announced; never more than it did."""
        left = self.request_left
        if left == CHUNKED:
            self.write(b"%x\r\n" % len(data), data, b"\r\n")
        elif len(data) <= left:
            self.request_left = left - len(data)
            self.write(data)
        else:  # more than announced: never written, and the connection is not reused
            self.overrun = True

    def end_body(self) -> None:
        """The request body is complete: the last chunk of a chunked one goes out."""
        if self.request_left == CHUNKED:
            self.request_left = 0
            self.write(b"0\r\n\r\n")

    def head_response_done(self) -> None:
        """A response with no body that llhttp cannot know has none (a HEAD's): it ended at
        its head, and the next response needs a parser in step."""
        self.restart_parser()
        self.response_done = True

    @property
    def writable(self) -> bool:
        return self._writable

    def write(self, *parts: bytes) -> None:
        """Write now, after anything ``hold`` kept."""
        self.out += parts
        self.flush()

    def hold(self, data: bytes) -> bool:
        """Keep ``data`` for ``flush`` (the caller batches writes); True if none was held."""
        first = not self.out
        self.out.append(data)
        return first

    def flush(self) -> None:
        parts, self.out = self.out, []
        write_parts(self.transport, parts)

    def restart_parser(self) -> None:
        """The response ended where llhttp did not see its end (a HEAD's head, or a body
        relayed past the parser): the next response needs a parser in step."""
        self.parser = httptools.HttpResponseParser(self)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.flush()
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.sink = None
        self.out = []
        if self.transport is not None:
            self.transport.abort()


def reuse_refusal(conn: UpstreamConnection) -> str | None:
    """Why ``conn`` must not carry another request, or None if it may: the one rule that
    keeps one request's bytes out of another's. Reused only if both directions were framed
    exactly (the request body written is what its head announced; the response was read to
    its framed end), the upstream did not ask to close, and no upgrade was asked for or made."""
    if conn.closed:
        return "closed"
    if conn.upgraded or conn.expect_upgrade:
        return "upgrade"
    if conn.request_left != 0 or conn.overrun:
        return "request body not sent exactly as framed"
    if not conn.response_done:
        return "response not read to its end"
    if not conn.keep_alive:
        return "upstream asked to close"
    return None


def write_parts(transport: asyncio.Transport | None, parts: list[bytes]) -> None:
    """Held parts in one system call: a plain write for one, a writev for several. Nothing
    for a transport gone or closing: its connection_lost reports that, where it matters."""
    if not parts or transport is None or transport.is_closing():
        return
    if len(parts) == 1:
        transport.write(parts[0])
    else:
        transport.writelines(parts)


def _framing(headers: list[tuple[bytes, bytes]]) -> tuple[int, bool]:
    """From a response head: its Content-Length (llhttp validated it), or -1 when a transfer
    coding is named or there is none (only a length lets the body be relayed without the
    parser); and whether the close delimits the body (neither a length nor chunked)."""
    length, coded, chunked = -1, False, False
    for name, value in headers:
        low = name.lower()
        if low == b"transfer-encoding":
            coded = True
            chunked = chunked or b"chunked" in value.lower()
        elif low == b"content-length":
            length = int(value)
    return (-1 if coded else length), (length < 0 and not chunked)


class UpstreamPool:
    """Keep-alive connections to one upstream, created lazily and reused LIFO."""

    def __init__(self, upstream: Upstream, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.upstream = upstream
        self.idle: deque[UpstreamConnection] = deque()
        self.active = 0  # requests using this pool now; a retired pool closes when it hits 0 (leave)
        self.retired = False
        # Told about bytes an idle connection received (it is closed): counted by the server.
        self.on_stray: Callable[[UpstreamConnection, str], None] | None = None
        self._ssl = ssl_context if upstream.tls else None
        if upstream.tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        self.host_header = (
            upstream.host
            if upstream.port == (443 if upstream.tls else 80)
            else f"{upstream.host}:{upstream.port}"
        ).encode()

    def leave(self) -> None:
        """A request (or a mirror copy) is done with this pool."""
        self.active -= 1
        if self.retired:  # checked here first: this runs once per request
            self._close_if_retired()

    def retire(self) -> None:
        """No longer in the config: closes once the requests still using it are done."""
        self.retired = True
        self._close_if_retired()

    def _close_if_retired(self) -> None:
        if self.retired and self.active == 0:
            self.close()

    def take_idle(self) -> UpstreamConnection | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > IDLE_TIMEOUT:
                conn.close()
                continue
            return conn
        return None

    async def connect(self, timeout: float) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        upstream = self.upstream
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self),
                    upstream.host,
                    upstream.port,
                    ssl=self._ssl,
                    server_hostname=upstream.host if self._ssl else None,
                )
        except TimeoutError:
            raise ConnectFailed(f"connect timeout to {upstream.url}", timeout=True) from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(f"cannot connect to {upstream.url}: {exc.strerror or exc}") from None
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Done with ``conn``, whatever happened: back to the pool if ``reuse_refusal`` allows,
        else closed. The only way into the pool."""
        conn.sink = None
        if self.retired or reuse_refusal(conn) is not None or len(self.idle) >= MAX_IDLE:
            conn.close()
            return
        transport = conn.transport
        if transport is not None and not transport.is_reading():
            transport.resume_reading()  # paused for a slow client; idle, it must see a close
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()
