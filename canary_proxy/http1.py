"""The data path: HTTP/1.1 on an asyncio Protocol with httptools (llhttp), no framework.

Each client connection parses requests with the C parser, routes each one once, and relays
it to a pooled upstream connection. Bodies are relayed as they arrive in both directions,
with backpressure: a slow reader pauses the other side's socket, so memory stays flat
whatever the body size. A request is driven by callbacks, with no task or future of its own
(a task only while a new upstream connection opens): the work that one loop iteration's reads
produce (requests to begin, response bytes to write) is done in one batch at its end, so each
peer gets its writes back to back (see ``ProxyServer.run_batch``).

The exception ladder: a client that leaves cancels its request (499 if nothing was sent);
a connect failure is 502 (or a failover to stable); no response headers within
``upstream-timeout`` is 504; a reset or malformed answer before the headers is 502; an
unexpected bug is a logged 500. Once response bytes went out no error page is written:
the client connection is aborted, so a truncated body never poses as a complete one.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import random
import re
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final

import httptools

from .accesslog import AccessLog
from .config import Config, Upstream, format_duration
from .metrics import Metrics
from .mirror import Copy, Mirrors
from .outlier import WINDOW, OutlierDetector
from .router import CANARY, STABLE, UNROUTED, Decision, decide, mirrored, random_bucket_source
from .tls import TlsError, read_ca, upstream_context
from .upstream import CHUNKED, IDEMPOTENT, ConnectFailed, UpstreamConnection, UpstreamPool, write_parts

log = logging.getLogger(__name__)

# RFC 9110 7.6.1 hop-by-hop fields, plus the legacy Proxy-Connection and Keep-Alive.
HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
     b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)  # fmt: skip
# What the edge says about the client: replaced by what the proxy saw, unless the peer is a
# trusted proxy (``--trust-forwarded-from``), whose values are kept and appended to.
FORWARDING: Final = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"x-real-ip",
     b"forwarded"}
)  # fmt: skip
# Set from what the proxy saw, or handled by the proxy itself.
_REPLACED: Final = FORWARDING | {b"x-request-id", b"expect", b"content-length", b"host"}
_UPSTREAM_DROP: Final = HOP_BY_HOP | _REPLACED
# Fields a request may carry once at most (RFC 9112 3.2, 6.1); a second one is a 400.
_SINGLE: Final = frozenset({b"host", b"transfer-encoding"})
# RFC 3986 host [":" port]: an IP literal, or reg-name characters (no "/", "?", "@", space...).
_VALID_HOST: Final = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::[0-9]{0,5})?")
_MAX_REQUEST_ID = 200
_WRITE_NOW = 64 << 10  # a response body read this large is written at once, not batched
_BODY_BUFFER_LIMIT = 1 << 20  # buffered request body before the upstream is ready; then pause
_REPLAY_LIMIT = 64 << 10  # request body kept for a retry after a stale pooled connection
_STATUS_TEXT: Final = {400: b"Bad Request", 405: b"Method Not Allowed", 413: b"Content Too Large",
                       417: b"Expectation Failed",
                       431: b"Request Header Fields Too Large", 499: b"Client Closed Request",
                       500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
                       503: b"Service Unavailable", 504: b"Gateway Timeout",
                       505: b"HTTP Version Not Supported"}  # fmt: skip
_BODY_ERRORS: Final = {400: "malformed request body", 413: "request body too large"}
WS_CLOSE_GOING_AWAY_TO_CLIENT: Final = b"\x88\x02\x03\xe9"  # unmasked close frame, code 1001


class UpstreamFailure(Exception):
    """Failed before any response byte went to the client; ``status`` is what we answer."""

    def __init__(self, status: int, reason: str, detail: str, *, counted: bool = False) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.counted = counted  # already in upstream_errors_total and the log


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may cost us; each is a ``serve`` flag (nginx's defaults where it has one)."""

    client_header_timeout: float = 10.0  # whole request head within this: stops slowloris
    keepalive_timeout: float = 75.0  # idle keep-alive connections are closed after this
    max_header_size: int = 8 << 10  # request line + headers, bytes; beyond it 431
    max_headers: int = 100  # header fields; beyond it 431
    max_body_size: int = 0  # request body bytes; beyond it 413; 0 = no limit
    max_connections: int = 10_000  # open client connections (TLS handshakes too); beyond it 503
    # Header names with "_" are dropped, as nginx does: CGI-style backends read X_Forwarded_For
    # as X-Forwarded-For (HTTP_X_FORWARDED_FOR), so a client could spoof what the edge set.
    underscores_in_headers: bool = False
    # CIDRs of proxies in front of us (a cloud load balancer) whose X-Forwarded-* are kept.
    trust_forwarded_from: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Runtime:
    """What one request needs, swapped as a whole when the config changes."""

    config: Config
    stable: UpstreamPool
    canary: UpstreamPool

    def pool(self, version: str) -> UpstreamPool:
        return self.canary if version == CANARY else self.stable


@dataclass(slots=True)
class Exchange:
    """Per-request facts for the metrics and the access log."""

    start: float
    method: str
    path: str
    client: str
    version: str
    rule: str
    request_id: str
    status: int = 0
    upstream_seconds: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    started: bool = False  # response headers sent to the client


_ids = random.Random(os.urandom(16))


def new_request_id() -> str:
    # Unique, not secret: a seeded PRNG avoids a getrandom(2) syscall per request.
    return f"{_ids.getrandbits(128):032x}"


def valid_request_id(value: bytes) -> bool:
    # Printable ASCII only: a client-chosen id must not inject into logs or headers.
    return 0 < len(value) <= _MAX_REQUEST_ID and all(32 < b < 127 for b in value)


def _drop(always: frozenset[bytes], headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The header names not to forward: ``always``, plus those the Connection header names.
    Most messages name none, so the common case builds no new set."""
    tokens = connection_tokens(headers)
    return always | tokens if tokens - always else always


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def request_target(url: bytes) -> bytes:
    """Path and query byte for byte. An absolute-form target is routed by its path only, so
    its host is never contacted: this proxy forwards to the configured upstreams, nowhere else.
    """
    if url.startswith(b"/") or url == b"*":  # "*": OPTIONS for the server as a whole
        return url
    scheme_end = url.find(b"://")
    if scheme_end < 0:
        return b"/" + url
    slash = url.find(b"/", scheme_end + 3)
    query = url.find(b"?", scheme_end + 3)
    if slash < 0 or 0 <= query < slash:
        return b"/" + (url[query:] if query >= 0 else b"")
    return url[slash:]


def forwarding(
    headers: list[tuple[bytes, bytes]], client: str, secure: bool, port: bytes, host: bytes | None
) -> bytes:
    """The X-Forwarded-* and X-Real-IP fields for a request from a trusted proxy: its values
    are kept (it saw the real client), the peer is appended to X-Forwarded-For, and what it
    did not say is filled in from what we saw."""
    given: dict[bytes, bytes] = {}
    chain: list[bytes] = []
    for name, value in headers:
        low = name.lower()
        if low == b"x-forwarded-for":
            chain.append(value)
        elif low in FORWARDING:
            given[low] = value
    peer = client.encode()
    first = chain[0].split(b",")[0].strip() if chain else b""
    real_ip = given.get(b"x-real-ip") or first or peer
    fields = [
        (b"X-Forwarded-For", b", ".join([*chain, peer])),
        (b"X-Real-IP", real_ip),
        (b"X-Forwarded-Proto", given.get(b"x-forwarded-proto") or (b"https" if secure else b"http")),
        (b"X-Forwarded-Port", given.get(b"x-forwarded-port") or port),
        (b"X-Forwarded-Host", given.get(b"x-forwarded-host") or host or b""),
        (b"Forwarded", given.get(b"forwarded", b"")),
    ]
    return b"".join(b"%s: %s\r\n" % (name, value) for name, value in fields if value)


def cookie_value(cookie_header: bytes | None, name: str) -> str | None:
    """One cookie's value from a Cookie header, without parsing the others."""
    if not cookie_header or not name:
        return None
    wanted = name.encode()
    for part in cookie_header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == wanted:
            return value.strip(b'"').decode("latin-1")
    return None


def simple_response(status: int, body: bytes, *, extra: bytes = b"", close: bool = False) -> bytes:
    head = b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % (
        status,
        _STATUS_TEXT.get(status, b"Error"),
        len(body),
    )
    return head + extra + (b"Connection: close\r\n" if close else b"") + b"\r\n" + body


class Request:
    """A parsed request head, and its body as it arrives."""

    __slots__ = (
        "body_done",
        "buffer",
        "buffered",
        "chunked",
        "content_length",
        "headers",
        "keep_alive",
        "lookup",
        "method",
        "received",
        "repeated",
        "sink",
        "upgrade",
        "upgrade_rest",
        "url",
        "version",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.lookup: dict[bytes, bytes] = {}  # lower-case name -> last value, for the few we read
        self.method = ""
        self.version = "1.1"
        self.keep_alive = True
        self.upgrade = False
        self.upgrade_rest = b""
        self.chunked = False
        self.content_length: int | None = None
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.received = 0  # body bytes, counted only when there is a size limit to enforce
        self.body_done = False
        self.repeated = False  # a field of _SINGLE came twice
        self.sink: Callable[[bytes], None] | None = None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests and runs them one at a time, in order."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.secure = False
        self.trusted = False  # the peer is in --trust-forwarded-from
        self.edge = b""  # X-Forwarded-For/-Proto/-Port and X-Real-IP, the same for each request
        self.port = b""  # our own port, for X-Forwarded-Port
        self.parser = httptools.HttpRequestParser(self)
        self.request: Request | None = None  # being parsed
        self.queue: deque[Request] = deque()  # parsed, waiting for the one in flight (pipelining)
        self.cycle: Cycle | None = None
        self.tunnel: UpstreamConnection | None = None  # after a WebSocket upgrade: raw bytes
        self.closing = False
        self._paused: set[str] = set()
        self._tick_handle: asyncio.TimerHandle | None = None  # the timeout clock, see _tick
        self._phase = "head"
        self._since = 0.0
        self._bad: int = 0  # status to answer once the request in flight is done
        self._reading_head = True
        self._head_bytes = 0
        # A non-WebSocket Upgrade request's Content-Length body, relayed here byte by byte:
        # httptools hands every upgrade request's bytes back unparsed (see _on_upgrade_request).
        self._raw_left = 0
        self._discard = False  # after a CONNECT: what follows is no HTTP, and is never parsed
        self.out: list[bytes] = []  # response bytes to write at the end of this loop iteration

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass
        server = self.server
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if peer else "unknown"
        self.secure = transport.get_extra_info("sslcontext") is not None
        server.handshaking.pop(self, None)
        if len(server.connections) + len(server.handshaking) >= server.limits.max_connections:
            transport.write(simple_response(503, b"503: too many connections\n", close=True))  # type: ignore[attr-defined]
            transport.close()
            return
        server.connections.add(self)
        self.trusted = server.trusts(self.client)
        sock = transport.get_extra_info("sockname")
        self.port = str(sock[1]).encode() if sock else b""
        self.edge = self._edge_headers()
        self._set_phase("head")
        self._tick_handle = server.loop.call_later(server.tick, self._tick)

    def _edge_headers(self) -> bytes:
        """What the proxy saw of this connection, for every request on it."""
        client = self.client.encode()
        proto = b"https" if self.secure else b"http"
        if self.trusted:
            return b""  # built per request: the peer's own values are kept (see ``forwarding``)
        return b"".join(
            b"%s: %s\r\n" % field
            for field in ((b"X-Forwarded-For", client), (b"X-Real-IP", client),
                          (b"X-Forwarded-Proto", proto), (b"X-Forwarded-Port", self.port))
        )  # fmt: skip

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.server.changed()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        if self.cycle is not None:
            self.cycle.client_gone()
        self.queue.clear()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self.request is not None and self.request.upgrade and self.request.body_done:
            self.request.upgrade_rest += data  # bytes sent before the upstream answered 101
            return
        if self._discard:
            return
        if self._raw_left:
            data = self._raw_body(data)
            if not data:
                return
        if self._reading_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
            if self._reading_head and self._head_bytes > self.server.limits.max_header_size:
                self.fail(431)  # a head still incomplete past the limit: stop buffering it
        except httptools.HttpParserUpgrade as exc:
            self._on_upgrade_request(data[exc.args[0] :])
        except httptools.HttpParserCallbackError:
            pass  # a callback already answered (e.g. 501) and closed
        except httptools.HttpParserError as exc:
            log.debug("malformed request from %s: %s", self.client, exc)
            self.fail(400)

    def pause_writing(self) -> None:
        if self.cycle is not None:
            self.cycle.client_writable(False)

    def resume_writing(self) -> None:
        if self.cycle is not None:
            self.cycle.client_writable(True)

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._set_phase("head")
        self.request = Request()

    def on_url(self, url: bytes) -> None:
        assert self.request is not None
        self.request.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.request
        if request is None or request.method:  # trailers after a chunked body are dropped
            return
        if b"_" in name and not self.server.limits.underscores_in_headers:
            return  # see Limits.underscores_in_headers
        low = name.lower()
        if low in request.lookup and low in _SINGLE:
            request.repeated = True
        request.headers.append((name, value))
        request.lookup[low] = value
        if len(request.headers) > self.server.limits.max_headers:
            self.fail(431)
            raise RuntimeError("too many headers")

    def on_headers_complete(self) -> None:
        request = self.request
        assert request is not None
        self._set_phase("busy")
        self._reading_head = False
        limits = self.server.limits
        head = len(request.url) + sum(len(n) + len(v) + 4 for n, v in request.headers)
        if head > limits.max_header_size:
            self.fail(431)
            raise RuntimeError("request head too large")
        parser = self.parser
        request.method = parser.get_method().decode("ascii", "replace")
        request.version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive()
        status = _invalid(request)
        if status:
            self.fail(status)
            raise RuntimeError("invalid request head")
        te = request.lookup.get(b"transfer-encoding")
        if te is not None:
            if te.strip().lower() != b"chunked":  # gzip, chunked etc.: we relay no other coding
                self.fail(501)
                raise RuntimeError("unsupported transfer coding")
            request.chunked = True
        length = request.lookup.get(b"content-length")
        if length is not None:
            request.content_length = int(length)  # llhttp validated it
            if limits.max_body_size and request.content_length > limits.max_body_size:
                self.fail(413)
                raise RuntimeError("request body too large")
        if request.method == "CONNECT":
            self._discard = True  # a tunnel's bytes follow: answered 405 and closed, never parsed
        elif parser.should_upgrade():
            self._upgrade_request(request)
        self.queue.append(request)
        if self.cycle is None:
            self._start_next()

    def on_body(self, body: bytes) -> None:
        request = self.request
        assert request is not None
        limit = self.server.limits.max_body_size
        if limit and request.chunked:
            request.received += len(body)
            if request.received > limit:
                self.fail(413)
                raise RuntimeError("request body too large")
        if request.sink is not None:
            request.sink(body)
            return
        request.buffer.append(body)
        request.buffered += len(body)
        if request.buffered > _BODY_BUFFER_LIMIT:
            self.pause_reading("body")

    def on_message_complete(self) -> None:
        if self._raw_left:  # httptools skipped this upgrade request's body: _raw_body relays it
            return
        self._message_done()

    def _message_done(self) -> None:
        request = self.request
        assert request is not None
        request.body_done = True
        self._reading_head = True
        self._head_bytes = 0
        if request.sink is not None:
            request.sink(b"")
        if not request.upgrade:
            self.request = None
            if self.cycle is None and not self.queue and not self._bad:
                self._set_phase("idle")  # answered before its body was read: now it is idle

    # -- running requests -------------------------------------------------------------------

    def _upgrade_request(self, request: Request) -> None:
        """Decided at the head, not when llhttp reports the upgrade: the request goes upstream
        at once. A WebSocket handshake is relayed as one (and may carry no body: its bytes
        after the head are WebSocket frames, never a body). Any other Upgrade (h2c, a custom
        one) is proxied as a plain request without it (Upgrade is hop-by-hop): its body is
        relayed exactly as framed and never parsed as a request of its own."""
        if _is_websocket(request):
            if request.has_body:
                self.fail(400)
                raise RuntimeError("a WebSocket handshake must not carry a body")
            request.upgrade = True
        elif request.chunked:  # llhttp would not find this body's end for us
            self.fail(400)
            raise RuntimeError("chunked upgrade request")
        else:
            self._raw_left = request.content_length or 0

    def _on_upgrade_request(self, rest: bytes) -> None:
        """llhttp stopped after an upgrade request's head; ``rest`` is what followed it."""
        request = self.request
        if request is not None and request.upgrade:  # a WebSocket: frames, held until the 101
            request.upgrade_rest = rest
            return
        self.parser = httptools.HttpRequestParser(self)  # this one parses nothing more
        if rest and not self._discard:
            self.data_received(rest)

    def _raw_body(self, data: bytes) -> bytes:
        """Relay the next of ``_raw_left`` body bytes; return what follows the body."""
        take = min(self._raw_left, len(data))
        self._raw_left -= take
        try:
            self.on_body(data[:take])
        except RuntimeError:  # on_body answered (e.g. 413) and will close
            self._discard = True
            return b""
        if not self._raw_left:
            self._message_done()
        return data[take:]

    def _start_next(self) -> None:
        if self.cycle is not None or not self.queue or self.transport is None:
            return
        request = self.queue.popleft()
        self.cycle = cycle = Cycle(self, request)
        self.server.schedule(cycle)

    def cycle_done(self, *, close: bool) -> None:
        self.cycle = None
        self.resume_reading("body")
        self.resume_reading("upstream")
        if close or self.draining or self.transport is None:
            self.close()
            return
        if self._bad:
            self.fail(self._bad)
            return
        if self.queue:
            self._start_next()
        elif self.request is None:
            self._set_phase("idle")

    def fail(self, status: int) -> None:
        """Answer a protocol error and close; after the request in flight, if there is one."""
        cycle = self.cycle
        if cycle is not None and not cycle.request.body_done:
            cycle.bad_body(status)  # the request in flight itself is malformed
            return
        if cycle is not None:
            self._bad = status  # a later, pipelined request is malformed
            self.pause_reading("bad")
            return
        if self.transport is None or self.transport.is_closing():
            return
        self._account_rejected(status)
        self.send_now(simple_response(status, b"%d\n" % status, close=True))
        self.close()

    def _account_rejected(self, status: int) -> None:
        """Counted (``version="none"``) and logged like any request: bad input is visible."""
        request = self.request
        ex = Exchange(
            start=time.monotonic(),
            method=request.method if request is not None else "",
            path=request.url.decode("latin-1") if request is not None else "",
            client=self.client,
            version=UNROUTED,
            rule="rejected",
            request_id=new_request_id(),
            status=status,
        )
        self.server.reject(ex)

    def pause_reading(self, reason: str) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    # Output: response bytes are held until the loop iteration's reads are handled, then
    # written by ProxyServer.run_batch: a head and its body go out in one segment, and the
    # client wakes once for all the responses of the iteration, not once per write (on
    # loopback, waking a sleeping reader costs more than the write itself).

    def send(self, *parts: bytes) -> None:
        if not self.out:
            self.server.flush_later(self)
        self.out += parts

    def send_now(self, data: bytes) -> None:
        self.out.append(data)
        self.flush()

    def flush(self) -> None:
        parts, self.out = self.out, []
        write_parts(self.transport, parts)

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.out = []
        if self.transport is not None:
            self.transport.abort()

    @property
    def draining(self) -> bool:
        """Answer with ``Connection: close`` and close after the response: we are shutting down."""
        return self.closing or self.server.closing

    def close_if_idle(self) -> None:
        """Shutting down: an idle keep-alive connection goes now; one that is reading a head
        (even one just accepted) is served first, then closed."""
        self.closing = True
        if self._phase == "idle" and self.cycle is None:
            self.close()

    @property
    def pending(self) -> bool:
        """Holding (or about to hold) an HTTP request: shutdown waits for it."""
        return self.tunnel is None and self._phase != "idle" and self.transport is not None

    # Timeouts: one clock per connection that ticks every ``server.tick`` seconds and checks
    # the deadline of whatever phase the connection is in: reading a head (header timeout),
    # idle (keep-alive timeout) or busy (the upstream timeout of the request in flight).
    # A request changes phases by storing a float; no timer is created or cancelled per
    # request, which the profile showed costs more than the check.

    def _set_phase(self, phase: str) -> None:
        self._phase = phase
        self._since = time.monotonic()

    def _tick(self) -> None:
        now = time.monotonic()
        limits = self.server.limits
        if self._phase == "head" and now - self._since >= limits.client_header_timeout:
            log.debug("closing %s: no complete request head within the header timeout", self.client)
            self.close()
            return
        if self._phase == "idle" and now - self._since >= limits.keepalive_timeout:
            self.close()
            return
        if self._phase == "busy" and self.cycle is not None:
            self.cycle.check_timeout(now)
        self._tick_handle = self.server.loop.call_later(self.server.tick, self._tick)


def _invalid(request: Request) -> int:
    """The status for a request head that is no valid HTTP/1.x request, or 0 (RFC 9112)."""
    version = request.version
    if version != "1.1" and version != "1.0":
        return 400 if version == "0.9" else 505  # llhttp knows 0.9 (no version at all) and 2.0
    if request.repeated:  # two Host or Transfer-Encoding fields: which one would a peer use?
        return 400
    host = request.lookup.get(b"host")
    if host is None:
        if version == "1.1":
            return 400
    elif not _VALID_HOST.fullmatch(host):
        return 400
    if version == "1.0" and b"transfer-encoding" in request.lookup:  # 1.0 has no chunked coding
        return 400
    if request.url == b"*" and request.method != "OPTIONS":
        return 400
    return 0


def _is_websocket(request: Request) -> bool:
    upgrade = request.lookup.get(b"upgrade", b"").strip().lower()
    return upgrade == b"websocket" and b"upgrade" in connection_tokens(request.headers)


# A Cycle's states. Most requests never leave the event loop's callbacks: a pooled connection
# is taken, the head written, and the cycle finishes in the upstream's completion callback.
# Only opening a connection needs a task (``_connect``): no Task or Future per request else.
_ROUTING: Final = 0  # not yet dispatched upstream
_CONNECTING: Final = 1  # the ``_connect`` task is opening a connection
_WAITING: Final = 2  # the request went upstream; an upstream callback or the clock settles it
_DONE: Final = 3  # accounted, and the connection told (``cycle_done``)


class Cycle:
    """One request's trip through the proxy: route, relay, account.

    Driven by callbacks: ``begin`` routes and dispatches; ``_resolve`` (from the upstream
    callbacks, the timeout clock or a malformed body) settles the attempt: done, retried once
    on a stale pooled connection, or answered with an error page; ``client_gone`` ends it with
    499. ``_finish`` runs exactly once, whatever the path.
    """

    def __init__(self, connection: ClientConnection, request: Request) -> None:
        self.connection = connection
        self.server = connection.server
        self.request = request
        self.state = _ROUTING
        self.task: asyncio.Task[None] | None = None  # only while opening a connection
        self.conn: UpstreamConnection | None = None  # in use, not yet released
        self.tried: UpstreamConnection | None = None  # of the current attempt, for the retry rule
        self.reused = False  # the current attempt's connection came from the pool
        self.retried = False
        self.pool: UpstreamPool | None = None  # the routed pool; its ``active`` counts us
        self.ex: Exchange | None = None
        self.decision: Decision | None = None
        self.runtime: Runtime | None = None
        self.expect_continue = False
        self.watching = False  # the upstream timeout applies (checked by the connection's clock)
        self.timeout = 0.0
        self.last_activity = 0.0
        self.body_framing = b""  # b"chunked", b"length", b"close" or b"" (no body)
        self.close_after = False
        self.websocket = False
        self.forwarded = 0  # request body bytes written upstream
        # The body sent on a pooled connection, kept (up to _REPLAY_LIMIT) so that a retry on
        # a fresh connection can resend it whole; None once it grew past the limit.
        self.replay: list[bytes] | None = []
        self.bytes_in = 0  # request body bytes received from the client
        self.bad_status = 0  # set when the request's own body is malformed
        self.mirror: Copy | None = None  # collecting the body of a copy for the canary

    # -- begin, settle, finish ------------------------------------------------------------

    def begin(self) -> None:
        if self.state != _ROUTING:  # the client left before its turn came
            return
        try:
            self._begin()
        except Exception:
            self._crash()

    def _begin(self) -> None:
        request = self.request
        if request.method == "CONNECT":
            self._send(simple_response(405, b"405: CONNECT is not allowed\n", close=True))
            self.close_after = True
            self._finish()
            return
        runtime = self.server.runtime
        if runtime is None:
            self._send(simple_response(503, b"503: no config loaded yet\n"))
            self._finish()
            return
        self._route(runtime)
        if self.bad_status:  # malformed before we even started
            self._fail(self._body_failure())
            return
        expect = request.lookup.get(b"expect")
        if expect is not None and expect.strip().lower() != b"100-continue":
            self._fail(UpstreamFailure(417, "client", "unsupported expectation"))
            return
        self.expect_continue = expect is not None
        self.websocket = request.upgrade
        self._acquire()

    def _route(self, runtime: Runtime) -> None:
        request, server = self.request, self.server
        config = runtime.config
        self.runtime = runtime
        self.decision = decision = self._decide(config)
        ejectable = decision.rule in ("weight", "sticky") and decision.version == CANARY
        if ejectable and config.canary_outlier_failures and server.canary_ejected():
            self.decision = decision = replace(decision, version=STABLE, rule="failover")
        rid = request.lookup.get(b"x-request-id")
        self.ex = ex = Exchange(
            start=time.monotonic(),
            method=request.method,
            path=request.url.decode("latin-1"),
            client=self.connection.client,
            version=decision.version,
            rule=decision.rule,
            request_id=rid.decode("ascii") if rid is not None and valid_request_id(rid) else new_request_id(),
        )
        server.enter(ex)
        if mirrored(config, decision, server.draw) and not request.upgrade:
            self._start_mirror(runtime)
        self.pool = runtime.pool(ex.version)
        self.pool.active += 1

    def _acquire(self) -> None:
        """Dispatch on a pooled connection now, or open one in a task."""
        runtime, ex = self.runtime, self.ex
        assert runtime is not None and ex is not None
        conn = runtime.pool(ex.version).take_idle()
        if conn is not None:
            self._dispatch(conn, reused=True)
            return
        self.state = _CONNECTING
        self.task = self.server.loop.create_task(self._connect(runtime))

    def _resolve(self, error: UpstreamFailure | None) -> None:
        """The attempt in flight ended; anything reported after that is ignored."""
        if self.state != _WAITING:
            return
        self.state = _ROUTING
        try:
            self._settle(error)
        except Exception:
            self._crash()

    def _settle(self, error: UpstreamFailure | None) -> None:
        if error is None:
            self._finish()
            return
        conn = self.tried
        assert conn is not None
        if self._retryable(error, conn):
            self.retried = True
            self.request.sink = None  # body that arrives meanwhile is buffered for the new attempt
            log.info("stale pooled connection to %s; retrying once on a fresh one", conn.pool.upstream.url)
            self._acquire()
            return
        if not error.counted and error.reason != "client":
            self._count_failure(error)
        self._fail(error)

    def _fail(self, failure: UpstreamFailure) -> None:
        """Answer an error page: nothing was sent to the client yet."""
        assert self.ex is not None
        self.ex.status = failure.status
        self.close_after = self.close_after or (self.request.has_body and not self.request.body_done)
        self._send_error(failure.status, str(failure))
        self._finish()

    def _crash(self) -> None:
        """A bug: a logged 500, or an aborted client connection once bytes went out."""
        self._drop_upstream()
        ex = self.ex
        if ex is not None and ex.started:
            log.exception("proxying failed after the response started; aborting")
            self.connection.abort()
        else:
            log.exception("proxying failed")
            if ex is not None:
                ex.status = 500
                self._send_error(500, "internal proxy error")
        self.close_after = True
        self._finish()

    def _finish(self) -> None:
        if self.state == _DONE:
            return
        self.state = _DONE
        self._cancel_timer()
        if self.ex is not None:
            self.server.account_later(self)  # after the response is written: see run_batch
        close = not self.request.keep_alive or self.close_after
        self.connection.cycle_done(close=close or self.connection.draining)

    def account(self) -> None:
        ex, pool, server = self.ex, self.pool, self.server
        if ex is None or pool is None:  # answered before routing
            return
        server.websocket_closed(self)
        pool.leave()
        ex.bytes_in = self.bytes_in
        server.leave(ex)

    def _start_mirror(self, runtime: Runtime) -> None:
        request = self.request
        head = self._upstream_head(runtime, runtime.canary, framing=False)
        self.mirror = self.server.mirrors.begin(
            runtime.canary, runtime.config, request.method, head,
            length=request.content_length, chunked=request.chunked,
        )  # fmt: skip

    def _decide(self, config: Config) -> Decision:
        lookup = self.request.lookup
        cookies = lookup.get(b"cookie")
        header = None
        if config.canary_by_header:
            raw = lookup.get(config.canary_by_header.lower().encode())
            header = raw.decode("latin-1") if raw is not None else None
        return decide(
            config,
            header=header,
            cookie=cookie_value(cookies, config.canary_by_cookie) if config.canary_by_cookie else None,
            sticky=cookie_value(cookies, config.sticky_cookie),
            draw=self.server.draw,
        )

    def _body_failure(self) -> UpstreamFailure:
        return UpstreamFailure(
            self.bad_status, "client", _BODY_ERRORS.get(self.bad_status, "bad request body")
        )

    def _dispatch(self, conn: UpstreamConnection, *, reused: bool) -> None:
        """Send the head (and what body there is) on ``conn``; the upstream callbacks follow."""
        runtime, ex = self.runtime, self.ex
        assert runtime is not None and ex is not None
        if self.bad_status:  # the body turned out malformed while we connected
            conn.pool.release(conn)
            self._fail(self._body_failure())
            return
        self.state = _WAITING
        self.conn = self.tried = conn
        self.reused = reused
        request = self.request
        framing = CHUNKED if request.chunked else request.content_length or 0
        conn.start(self, framing=framing, upgrade=self.websocket)
        conn.version = ex.version
        self.server.hold_upstream(conn, self._upstream_head(runtime, conn.pool))
        if self.expect_continue and request.version == "1.1" and not request.body_done:
            self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._attach_body(conn)
        self._arm_timer(runtime.config.upstream_timeout)

    def _retryable(self, failure: UpstreamFailure, conn: UpstreamConnection) -> bool:
        """A pooled connection the upstream had closed: retry once, when it is safe to:
        idempotent methods, and requests none of whose body has been sent yet; and only if
        the body can be sent again in full (none sent yet, or all of it kept in ``replay``)."""
        safe = self.request.method in IDEMPOTENT or self.forwarded == 0
        whole = self.forwarded == 0 or self.replay is not None
        stale = failure.reason == "reset" and self.reused and not self.retried and not conn.got_bytes
        return stale and safe and whole

    # -- opening a connection: the one part that awaits ---------------------------------

    async def _connect(self, runtime: Runtime) -> None:
        # A client that leaves cancels this task; ``client_gone`` has finished the cycle then.
        try:
            conn, reused = await self._open_with_failover(runtime)
            self.task = None
            self._dispatch(conn, reused=reused)
        except UpstreamFailure as failure:
            self.task = None
            self._fail(failure)
        except Exception:
            self.task = None
            self._crash()

    async def _open_with_failover(self, runtime: Runtime) -> tuple[UpstreamConnection, bool]:
        ex = self.ex
        assert ex is not None
        try:
            return await self._open(runtime.pool(ex.version), runtime)
        except UpstreamFailure as failure:
            config = runtime.config
            if failure.reason == "connect" and ex.version == CANARY:
                self.server.canary_failed(config)
            if not (failure.reason == "connect" and ex.version == CANARY and config.canary_failover):
                raise
        log.warning("canary unreachable, failing over to stable (request %s)", ex.request_id)
        self.server.move(ex, STABLE, "failover")
        return await self._open(runtime.pool(STABLE), runtime)

    async def _open(self, pool: UpstreamPool, runtime: Runtime) -> tuple[UpstreamConnection, bool]:
        conn = pool.take_idle()
        if conn is not None:
            return conn, True
        try:
            return await pool.connect(runtime.config.upstream_connect_timeout), False
        except ConnectFailed as exc:
            raise self._failure(502, "connect", str(exc)) from None

    def _failure(self, status: int, reason: str, detail: str) -> UpstreamFailure:
        failure = UpstreamFailure(status, reason, detail, counted=True)
        self._count_failure(failure)
        return failure

    def _count_failure(self, failure: UpstreamFailure) -> None:
        ex = self.ex
        assert ex is not None
        self.server.metrics.upstream_errors.labels(ex.version, failure.reason).inc()
        log.warning(
            "upstream %s failed (%s): %s [request %s]", ex.version, failure.reason, failure, ex.request_id
        )

    # -- the request head and body, upstream ----------------------------------------------

    def _upstream_head(self, runtime: Runtime, pool: UpstreamPool, *, framing: bool = True) -> bytes:
        """The request head for ``pool``'s upstream; without the framing fields and the blank
        line that ends it if not ``framing`` (a mirror copy adds its own)."""
        request, ex, client = self.request, self.ex, self.connection
        assert ex is not None
        drop = _drop(_UPSTREAM_DROP, request.headers)
        parts = [request.method.encode(), b" ", request_target(request.url), b" HTTP/1.1\r\n"]
        host = request.lookup.get(b"host")
        parts += [b"Host: ", host if host is not None else pool.host_header, b"\r\n"]
        for name, value in request.headers:
            if name.lower() not in drop:
                parts += [name, b": ", value, b"\r\n"]
        if client.trusted:
            parts.append(forwarding(request.headers, client.client, client.secure, client.port, host))
        else:
            parts.append(client.edge)  # the same for every request on this connection
            if host is not None:
                parts += [b"X-Forwarded-Host: ", host, b"\r\n"]
        parts += [b"X-Request-Id: ", ex.request_id.encode(), b"\r\n"]
        if self.websocket:
            parts += [b"Connection: Upgrade\r\nUpgrade: ", request.lookup[b"upgrade"], b"\r\n"]
        if not framing:
            return b"".join(parts)
        if request.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif request.content_length is not None:
            parts.append(b"Content-Length: %d\r\n" % request.content_length)
        parts.append(b"\r\n")
        return b"".join(parts)

    def _attach_body(self, conn: UpstreamConnection) -> None:
        """Send what the client sent so far; then relay each new chunk as it is parsed. On a
        retry, what the first attempt sent goes first (``_retryable`` made sure it is whole)."""
        request = self.request
        if not request.has_body:
            return
        mirror = self.mirror
        sent = (self.replay or []) if self.retried else []
        self.replay = [] if self.reused else None  # only a pooled connection can turn out stale
        self.forwarded = 0

        def sink(data: bytes) -> None:
            if not data:  # end of body
                if mirror is not None:
                    mirror.feed(data)
                conn.end_body()
                return
            if mirror is not None:
                mirror.feed(data)
            self.bytes_in += len(data)
            self._forward(conn, data)

        for data in sent:
            self._forward(conn, data)
        buffered, request.buffer = request.buffer, []
        request.buffered = 0
        request.sink = sink
        for data in buffered:
            sink(data)
        if request.body_done:
            sink(b"")
        self.connection.resume_reading("body")

    def _forward(self, conn: UpstreamConnection, data: bytes) -> None:
        self.forwarded += len(data)
        replay = self.replay
        if replay is not None:
            if self.forwarded <= _REPLAY_LIMIT:
                replay.append(data)  # a reference, not a copy: bytes are immutable
            else:
                self.replay = None
        conn.write_body(data)

    # -- upstream callbacks (ResponseSink) ------------------------------------------------

    def on_response_head(self, conn: UpstreamConnection) -> None:
        ex, runtime = self.ex, self.runtime
        assert ex is not None and runtime is not None
        ex.upstream_seconds = time.monotonic() - ex.start
        ex.status = conn.status
        self.last_activity = time.monotonic()
        if self.request.method == "HEAD":
            # llhttp cannot be told this response has no body: give the connection a fresh
            # parser and finish now; the Content-Length describes the GET body, not this one.
            conn.head_response_done()
            self.connection.send(self._client_head(conn, runtime.config))
            ex.started = True
            self.on_response_complete()
            return
        if self.websocket and conn.status != 101:
            self.close_after = True  # refused: our parser is past the upgrade, start afresh
        self.connection.send(self._client_head(conn, runtime.config))
        ex.started = True

    def on_response_body(self, data: bytes) -> None:
        ex = self.ex
        assert ex is not None
        ex.bytes_out += len(data)
        self.last_activity = time.monotonic()
        if self.body_framing == b"chunked":
            self.connection.send(b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.connection.send(data)
        if len(data) >= _WRITE_NOW:
            # A large body can arrive as several reads in one loop iteration (libuv reads on
            # while data is there): held until the batch, a 1 MiB response went out as one
            # writev the client socket could not take, with no backpressure in between.
            self.connection.flush()

    def on_response_complete(self) -> None:
        conn = self.conn
        if self.body_framing == b"chunked":
            self.connection.send(b"0\r\n\r\n")
        if conn is not None:
            self.conn = None
            if self.request.has_body and not self.request.body_done:
                # Answered before the whole body arrived: the client is still sending it,
                # and its connection ends with this response (the upstream's is not reused).
                self.close_after = True
            conn.pool.release(conn)
        self._resolve(None)

    def on_upstream_upgraded(self, rest: bytes) -> None:
        """The upstream switched protocols: from here on, splice raw bytes both ways."""
        conn, connection, ex = self.conn, self.connection, self.ex
        assert conn is not None and ex is not None
        self._cancel_timer()
        connection.tunnel = conn
        self.server.websocket_opened(self)
        if rest:
            self.on_upstream_raw(rest)
        early = self.request.upgrade_rest
        if early:
            conn.write(early)

    def on_upstream_raw(self, data: bytes) -> None:
        if self.ex is not None:
            self.ex.bytes_out += len(data)
        self._send(data)

    def on_upstream_error(self, reason: str, detail: str) -> None:
        ex = self.ex
        assert ex is not None
        self.conn = None
        if reason == "closed":  # an upgraded connection ended: that is the end of the session
            self.close_after = True
            self.server.websocket_closed(self)
            self._resolve(None)
            return
        if ex.started:
            self._mid_body_failure(reason, detail)
            return
        # Counted by _exchange unless it retries: a stale pooled connection is no upstream error.
        self._resolve(UpstreamFailure(502, reason, detail))

    def on_upstream_writable(self, writable: bool) -> None:
        if writable:
            self.connection.resume_reading("upstream")
        else:
            self.connection.pause_reading("upstream")

    # -- client side ------------------------------------------------------------------------

    def client_writable(self, writable: bool) -> None:
        conn = self.conn if self.conn is not None else self.connection.tunnel
        if conn is None or conn.transport is None:
            return
        if writable:
            conn.transport.resume_reading()
        else:
            conn.transport.pause_reading()

    def bad_body(self, status: int) -> None:
        """The client's body turned out malformed mid-stream: the upstream must not take an
        incomplete request for a whole one, so its connection is aborted."""
        log.debug("rejected the request body from %s with %d", self.connection.client, status)
        self._drop_upstream()
        self.close_after = True
        self.bad_status = status
        self.connection.pause_reading("bad")
        self._resolve(self._body_failure())

    def client_gone(self) -> None:
        if self.websocket and self.connection.tunnel is not None:
            self.connection.tunnel.close()
            return
        if self.state == _ROUTING:  # not begun: nothing to account, as if never parsed
            self.state = _DONE
            return
        if self.state == _DONE:
            return
        task, self.task = self.task, None
        if task is not None:
            task.cancel()  # stop opening a connection nobody will use
        self._drop_upstream()
        ex = self.ex
        if ex is not None and not ex.started:
            ex.status = 499  # nginx's code for a client that left before the response
        self.close_after = True
        self._finish()

    def _client_head(self, conn: UpstreamConnection, config: Config) -> bytes:
        request, ex, decision = self.request, self.ex, self.decision
        assert ex is not None and decision is not None
        status = conn.status
        drop = _drop(HOP_BY_HOP, conn.headers)
        parts = [b"HTTP/1.1 %d " % status, conn.reason, b"\r\n"]
        length = None
        for name, value in conn.headers:
            low = name.lower()
            if low == b"content-length":
                length = value
            elif low not in drop:
                parts += [name, b": ", value, b"\r\n"]
        if status == 101:
            parts += [b"Connection: Upgrade\r\nUpgrade: ", _header(conn.headers, b"upgrade"), b"\r\n"]
        elif request.method == "HEAD" or status in (204, 304) or status < 200:
            if length is not None and status != 204:
                parts += [b"Content-Length: ", length, b"\r\n"]
        elif length is not None:
            self.body_framing = b"length"
            parts += [b"Content-Length: ", length, b"\r\n"]
        elif request.version == "1.1":
            self.body_framing = b"chunked"
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            self.body_framing = b"close"
            self.close_after = True
        parts.append(self._own_headers(config, decision))
        if status != 101 and (self.close_after or self.connection.draining or not request.keep_alive):
            self.close_after = True
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _own_headers(self, config: Config, decision: Decision) -> bytes:
        ex = self.ex
        assert ex is not None
        own = b""
        if config.version_header:
            own += b"%s: %s\r\n" % (config.version_header.encode(), ex.version.encode())
        own += b"X-Request-Id: %s\r\n" % ex.request_id.encode()
        if decision.set_cookie and decision.bucket is not None:
            own += b"Set-Cookie: %s=%d; Path=/; Max-Age=%d; HttpOnly; SameSite=Lax\r\n" % (
                config.sticky_cookie.encode(),
                decision.bucket,
                config.sticky_max_age,
            )
        return own

    def _send(self, data: bytes) -> None:
        self.connection.send_now(data)

    def _send_error(self, status: int, detail: str) -> None:
        runtime, decision = self.runtime, self.decision
        assert runtime is not None and decision is not None
        own = self._own_headers(runtime.config, decision)
        close = self.close_after or self.connection.draining or not self.request.keep_alive
        self._send(simple_response(status, f"{status}: {detail}\n".encode(), extra=own, close=close))

    def _mid_body_failure(self, reason: str, detail: str) -> None:
        ex = self.ex
        assert ex is not None
        self.server.metrics.upstream_errors.labels(ex.version, reason).inc()
        log.warning(
            "upstream %s broke mid-body (%s: %s); aborting the client connection", ex.version, reason, detail
        )
        self.connection.abort()
        self.close_after = True
        self._resolve(None)

    def _drop_upstream(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()

    # -- timeouts -------------------------------------------------------------------------

    def _arm_timer(self, timeout: float) -> None:
        self.timeout = timeout
        self.last_activity = time.monotonic()
        self.watching = True

    def check_timeout(self, now: float) -> None:
        """No response head, or no body data, for ``upstream-timeout``: 504 or an abort."""
        timeout = self.timeout
        if not self.watching or now - self.last_activity < timeout:
            return
        self.watching = False
        ex = self.ex
        assert ex is not None
        self._drop_upstream()
        if ex.started:
            self._mid_body_failure("timeout", f"no data for {timeout:g}s")
        else:
            self._resolve(self._failure(504, "timeout", f"no response within {timeout:g}s"))

    def _cancel_timer(self) -> None:
        self.watching = False


def masked_close_frame(code: int) -> bytes:
    """A client-to-server WebSocket close frame (RFC 6455 5.3: a client must mask)."""
    mask = os.urandom(4)
    payload = code.to_bytes(2, "big")
    return b"\x88\x82" + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    for key, value in headers:
        if key.lower() == name:
            return value
    return b""


def _tick_for(limits: Limits, config: Config | None) -> float:
    """How often each connection checks its deadlines: a quarter of the shortest timeout, so
    a timeout fires at most 25 % late, and at most once a second for the long defaults."""
    shortest = min(limits.client_header_timeout, limits.keepalive_timeout)
    if config is not None:
        shortest = min(shortest, config.upstream_timeout)
    return max(0.01, min(1.0, shortest / 4))


class ProxyServer:
    """The public port's state: the current config, pools, connections, in-flight counts."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        access_log: AccessLog | None,
        draw: Callable[[], int] | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self.draw = draw or random_bucket_source()
        self.limits = limits or Limits()
        self.tls: ssl.SSLContext | None = None  # the public port's, set by serve_public
        # Connections accepted whose TLS handshake is not done: they count toward
        # max_connections. The TLS layer tells us nothing of a failed handshake, so an entry
        # leaves by age once the handshake timeout has surely ended it (see _handshakes).
        self.handshaking: dict[ClientConnection, float] = {}
        self._trusted = tuple(ipaddress.ip_network(c, strict=False) for c in self.limits.trust_forwarded_from)
        self.tick = _tick_for(self.limits, None)
        self.runtime: Runtime | None = None
        self.pools: dict[str, UpstreamPool] = {}  # by URL (and CA bundle, for https)
        self._ca: tuple[str, ssl.SSLContext] | None = None  # upstream-ca: (digest, context)
        self.outlier = OutlierDetector()
        self.connections: set[ClientConnection] = set()
        self.websockets: set[Cycle] = set()
        self.mirrors = Mirrors(metrics)
        self.in_flight = 0  # requests in progress, WebSockets included
        self.closing = False
        self._changed = asyncio.Event()
        self._ready: list[Cycle] = []  # parsed requests, begun together once reads are done
        self._unflushed: list[ClientConnection] = []  # connections holding response bytes
        self._upstream_unflushed: list[UpstreamConnection] = []  # holding request heads
        self._finished: list[Cycle] = []  # to account: metrics, access log, in-flight count
        self._batch_due = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        # Cached: asyncio.get_running_loop() costs a getpid(2) syscall on each call.
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # Batching: the requests parsed and the responses received in one loop iteration are
    # handled once all its reads are done, in one callback: the writes to each peer then go
    # out back to back, and a peer asleep in epoll_wait wakes once for the lot. On loopback
    # such a wake-up costs as much as the proxying itself, once per write if spread out.

    def schedule(self, cycle: Cycle) -> None:
        """Begin ``cycle`` with the other requests of this iteration (not inside the parser's
        callbacks, either: they would swallow a bug's exception)."""
        self._ready.append(cycle)
        self._batch_soon()

    def flush_later(self, connection: ClientConnection) -> None:
        self._unflushed.append(connection)
        self._batch_soon()

    def hold_upstream(self, conn: UpstreamConnection, head: bytes) -> None:
        if conn.hold(head):
            self._upstream_unflushed.append(conn)
            self._batch_soon()

    def account_later(self, cycle: Cycle) -> None:
        self._finished.append(cycle)
        self._batch_soon()

    def _batch_soon(self) -> None:
        if not self._batch_due:
            self._batch_due = True
            self.loop.call_soon(self.run_batch)

    def run_batch(self) -> None:
        """Responses out, requests begun (whose heads are only held), the heads out, and last
        the accounting of finished requests, which so delays no response; again if that work
        made more (a request answered at once lets a pipelined one begin)."""
        try:
            while self._unflushed or self._ready or self._upstream_unflushed or self._finished:
                unflushed, self._unflushed = self._unflushed, []
                ready, self._ready = self._ready, []
                for connection in unflushed:  # first: these bytes precede what a new request sends
                    connection.flush()
                for cycle in ready:
                    cycle.begin()
                upstream, self._upstream_unflushed = self._upstream_unflushed, []
                for conn in upstream:
                    conn.flush()
                finished, self._finished = self._finished, []
                for cycle in finished:
                    try:
                        cycle.account()
                    except Exception:
                        log.exception("accounting a request failed")
        finally:
            self._batch_due = False

    def protocol(self) -> ClientConnection:
        connection = ClientConnection(self)
        if self.tls is not None:  # called at accept, before the handshake
            now = time.monotonic()
            self._handshakes(now)
            self.handshaking[connection] = now
        return connection

    def handshake_timeout(self) -> float:
        # The handshake comes before our header timeout starts: bound it the same way.
        return max(0.1, self.limits.client_header_timeout)

    def _handshakes(self, now: float) -> None:
        """Forget handshakes older than the handshake timeout: failed, never to be made."""
        expired = now - self.handshake_timeout() - 1.0
        handshaking = self.handshaking
        while handshaking:
            oldest, since = next(iter(handshaking.items()))
            if since > expired:
                break
            del handshaking[oldest]

    def trusts(self, client: str) -> bool:
        """Whether ``client`` is a proxy in --trust-forwarded-from, whose X-Forwarded-* we keep."""
        if not self._trusted:
            return False
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._trusted)

    def apply(self, config: Config) -> None:
        try:
            ca = self._upstream_ca(config)
        except TlsError as exc:  # validated before, so only if the file changed since
            log.error("cannot apply the new config, keeping the current one: upstream-ca: %s", exc)
            return
        self.tick = _tick_for(self.limits, config)
        previous = self.runtime.config if self.runtime is not None else None
        if previous is None or previous.canary != config.canary or not config.canary_outlier_failures:
            self.outlier.reset()  # a new canary (or protection turned off) starts with a clean slate
        stable, canary = self._pool(config.stable, ca), self._pool(config.canary, ca)
        self.runtime = Runtime(config, stable, canary)
        for key in [k for k, p in self.pools.items() if p is not stable and p is not canary]:
            self.pools.pop(key).retire()

    def _upstream_ca(self, config: Config) -> tuple[str, ssl.SSLContext] | None:
        """The client context for https upstreams, built once per distinct CA bundle content."""
        if config.upstream_ca is None:
            return None
        data = read_ca(config.upstream_ca)
        digest = hashlib.sha256(data).hexdigest()
        if self._ca is None or self._ca[0] != digest:
            self._ca = (digest, upstream_context(data, origin=config.upstream_ca))
        return self._ca

    def _pool(self, upstream: Upstream, ca: tuple[str, ssl.SSLContext] | None) -> UpstreamPool:
        key = f"{upstream.url} ca={ca[0]}" if upstream.tls and ca is not None else upstream.url
        pool = self.pools.get(key)
        if pool is None:
            context = ca[1] if upstream.tls and ca is not None else None
            pool = self.pools[key] = UpstreamPool(upstream, ssl_context=context)
            pool.on_stray = self._stray
        return pool

    def canary_ejected(self) -> bool:
        now = time.monotonic()
        if self.outlier.expired(now):
            log.info("canary outlier cool-down over: the canary gets its weighted share again")
        return self.outlier.ejected(now)

    def canary_failed(self, config: Config) -> None:
        """One connect failure to the canary: eject it when that crosses the threshold."""
        threshold, cooldown = config.canary_outlier_failures, config.canary_outlier_cooldown
        if self.outlier.failure(time.monotonic(), threshold=threshold, cooldown=cooldown):
            self.metrics.outlier_ejections.inc()
            log.warning(
                "canary ejected for %s: %d connect failures within %gs; its weighted share goes to stable",
                format_duration(cooldown),
                threshold,
                WINDOW,
                extra={"canary": config.canary.url},
            )

    def _stray(self, conn: UpstreamConnection, detail: str) -> None:
        version = conn.version or STABLE
        self.metrics.upstream_errors.labels(version, "protocol").inc()
        log.warning(
            "upstream %s (%s) sent %s; closed that connection", version, conn.pool.upstream.url, detail
        )

    # -- accounting -------------------------------------------------------------------------

    def enter(self, ex: Exchange) -> None:
        self.in_flight += 1
        self.metrics.in_flight_by[ex.version].inc()

    def move(self, ex: Exchange, version: str, rule: str) -> None:
        self.metrics.in_flight_by[ex.version].dec()
        ex.version, ex.rule = version, rule
        self.metrics.in_flight_by[version].inc()

    def reject(self, ex: Exchange) -> None:
        self.metrics.count_rejected(ex.status, ex.method)
        if self.access_log is not None:
            self.access_log.write(ex, 0.0)

    def leave(self, ex: Exchange) -> None:
        seconds = time.monotonic() - ex.start
        m = self.metrics
        m.in_flight_by[ex.version].dec()
        m.count_request(ex.version, ex.status, ex.method, seconds)
        m.count_decision(ex.version, ex.rule)
        if self.access_log is not None:
            self.access_log.write(ex, seconds)
        self.in_flight -= 1
        self._changed.set()

    def changed(self) -> None:
        self._changed.set()

    def websocket_opened(self, cycle: Cycle) -> None:
        assert cycle.ex is not None
        self.websockets.add(cycle)
        self.metrics.websockets.labels(cycle.ex.version).inc()
        self._changed.set()

    def websocket_closed(self, cycle: Cycle) -> None:
        if cycle in self.websockets:
            self.websockets.discard(cycle)
            assert cycle.ex is not None
            self.metrics.websockets.labels(cycle.ex.version).dec()
            self._changed.set()

    # -- shutdown ---------------------------------------------------------------------------

    async def wait_http_idle(self, deadline: float) -> None:
        """Wait until only WebSockets are left in flight, or until the loop time ``deadline``."""
        loop = asyncio.get_running_loop()
        for connection in list(self.connections):
            connection.close_if_idle()
        while self.in_flight > len(self.websockets) or any(c.pending for c in self.connections):
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.warning("shutdown timeout: %d requests still in flight", self.in_flight)
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    async def close_websockets(self) -> None:
        """Tell both ends of every WebSocket we are going away (close code 1001)."""
        for cycle in list(self.websockets):
            tunnel = cycle.connection.tunnel
            cycle.connection.tunnel = None  # stop relaying the client's own close frame
            cycle._send(WS_CLOSE_GOING_AWAY_TO_CLIENT)
            if tunnel is not None:
                tunnel.write(masked_close_frame(1001))
                tunnel.close()
            cycle.connection.close()

    async def close(self, timeout: float = 1.0) -> None:
        for connection in list(self.connections):
            connection.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.connections and loop.time() < deadline:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
            except TimeoutError:
                break
        for connection in list(self.connections):
            connection.abort()
        self.mirrors.cancel()
        for pool in self.pools.values():
            pool.close()
        await asyncio.sleep(0)  # the aborted connections' connection_lost: their log lines
        self.run_batch()
        if self.access_log is not None:
            self.access_log.flush()
