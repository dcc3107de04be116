"""A client connection: parses requests with httptools (llhttp) and runs them one at a time.

Each client connection parses requests with the C parser and hands each one to a Cycle,
which routes it once and relays it. Bodies are relayed as they arrive in both directions,
with backpressure: a slow reader pauses the other side's socket, so memory stays flat
whatever the body size. A request is driven by callbacks, with no task or future of its own
(a task only while a new upstream connection opens): the work that one loop iteration's reads
produce (requests to begin, response bytes to write) is done in one batch at its end, so each
peer gets its writes back to back (see ``ProxyServer.run_batch``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Final, Protocol

import httptools

from .cycle import Cycle
from .exchange import Exchange, Proxy, unrouted
from .headers import SINGLE, Peer, invalid_head, is_websocket, simple_response
from .limits import Limits
from .request import Request
from .upstream import UpstreamConnection, write_parts

log = logging.getLogger(__name__)

_BODY_BUFFER_LIMIT = 1 << 20  # buffered request body before the upstream is ready; then pause
# The usual methods' names, decoded once: not once per request.
_METHODS: Final = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}


class Server(Proxy, Protocol):
    """What a client connection needs of the server it belongs to (and its cycles, of it)."""

    limits: Limits
    tick: float  # how often each connection checks its deadlines
    closing: bool
    connections: set[ClientConnection]
    handshaking: dict[ClientConnection, float]
    body_limits: bool  # some route has a body limit of its own: ask body_limit

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    def body_limit(self, request: Request) -> int: ...
    def trusts(self, client: str) -> bool: ...
    def schedule(self, cycle: Cycle) -> None: ...
    def flush_later(self, connection: ClientConnection) -> None: ...
    def changed(self) -> None: ...
    def reject(self, ex: Exchange) -> None: ...


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests and runs them one at a time, in order."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = Peer("unknown", secure=False, port=b"")
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
        server.handshaking.pop(self, None)
        if len(server.connections) + len(server.handshaking) >= server.limits.max_connections:
            transport.write(simple_response(503, b"503: too many connections\n", close=True))  # type: ignore[attr-defined]
            transport.close()
            return
        server.connections.add(self)
        peer, sock = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        client = str(peer[0]) if peer else "unknown"
        self.peer = Peer.of(
            client,
            secure=transport.get_extra_info("sslcontext") is not None,
            port=str(sock[1]).encode() if sock else b"",
            trusted=server.trusts(client),
        )
        self._set_phase("head")
        self._tick_handle = server.loop.call_later(server.tick, self._tick)

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
            log.debug("malformed request from %s: %s", self.peer.client, exc)
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
        if low in request.lookup and low in SINGLE:
            request.repeated = True
        request.headers.append((name, value))
        request.lookup[low] = value
        if len(request.headers) > self.server.limits.max_headers:
            self.fail(431)
            raise RuntimeError("too many headers")

    def on_headers_complete(self) -> None:
        request = self.request
        assert request is not None
        self._phase = "busy"  # no _since: the request's own upstream clock times it
        self._reading_head = False
        limits = self.server.limits
        head = len(request.url)
        for name, value in request.headers:  # a loop, not sum() over a generator: cheaper here
            head += len(name) + len(value) + 4
        if head > limits.max_header_size:
            self.fail(431)
            raise RuntimeError("request head too large")
        parser = self.parser
        raw = parser.get_method()
        request.method = _METHODS.get(raw) or raw.decode("ascii", "replace")
        request.version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive()
        status = invalid_head(request.version, request.method, request.url, request.lookup, request.repeated)
        if status:
            self.fail(status)
            raise RuntimeError("invalid request head")
        te = request.lookup.get(b"transfer-encoding")
        if te is not None:
            if te.strip().lower() != b"chunked":  # gzip, chunked etc.: we relay no other coding
                self.fail(501)
                raise RuntimeError("unsupported transfer coding")
            request.chunked = True
        server = self.server
        limit = request.body_limit = (
            server.body_limit(request) if server.body_limits else limits.max_body_size
        )
        length = request.lookup.get(b"content-length")
        if length is not None:
            request.content_length = int(length)  # llhttp validated it
            if limit and request.content_length > limit:
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
        limit = request.body_limit
        if limit and request.chunked:
            request.received += len(body)
            if request.received > limit:
                self.fail(413)
                raise RuntimeError("request body too large")
        if request.relay is not None:
            request.relay.request_body(body)
            return
        request.buffer.append(body)
        request.buffered += len(body)
        if request.buffered > _BODY_BUFFER_LIMIT:
            self.pause_reading("body")

    def on_message_complete(self) -> None:
        """The request ended: from llhttp, or from ``_raw_body`` for an upgrade request's
        body, which llhttp skipped (and reports complete before that body came)."""
        if self._raw_left:
            return
        request = self.request
        assert request is not None
        request.body_done = True
        self._reading_head = True
        self._head_bytes = 0
        if request.relay is not None:
            request.relay.request_body(b"")
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
        if is_websocket(request.headers, request.lookup):
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
            self.on_message_complete()
        return data[take:]

    def _start_next(self) -> None:
        if self.cycle is not None or not self.queue or self.transport is None:
            return
        request = self.queue.popleft()
        self.cycle = cycle = Cycle(self, self.server, request)
        self.server.schedule(cycle)

    def cycle_done(self, close: bool) -> None:
        """The request in flight is answered; ``close``: this connection ends with it (so it
        does too while draining)."""
        self.cycle = None
        if self._paused:  # most requests paused nothing
            self.resume_reading("body")
            self.resume_reading("upstream")
        if close or self.draining or self.transport is None:
            self.close()
            return
        if self.queue:  # the pipelined requests parsed before a malformed one are served first
            self._start_next()
        elif self._bad:
            self.fail(self._bad)
        elif self.request is None:
            self._set_phase("idle")

    def fail(self, status: int) -> None:
        """Answer a protocol error and close; after the request in flight, if there is one."""
        cycle = self.cycle
        if cycle is not None and not cycle.request.body_done:
            cycle.bad_body(status)  # the request in flight itself is malformed
            return
        if cycle is not None:
            # A later, pipelined request is malformed: answered once those before it are.
            # It may be queued already (its head was fine, its body is not): never begun.
            request = self.request
            if request is not None and request in self.queue:
                self.queue.remove(request)
            self._bad = status
            self.pause_reading("bad")
            return
        if self.transport is None or self.transport.is_closing():
            return
        self._account_rejected(status)
        head = self.request is not None and self.request.method == "HEAD"
        self.send_now(simple_response(status, b"%d\n" % status, close=True, head=head))
        self.close()

    def _account_rejected(self, status: int) -> None:
        """Counted (``version="none"``) and logged like any request: bad input is visible."""
        self.server.reject(unrouted(self.request, self.peer.client, status=status, rule="rejected"))

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
            log.debug("closing %s: no complete request head within the header timeout", self.peer.client)
            self.close()
            return
        if self._phase == "idle" and now - self._since >= limits.keepalive_timeout:
            self.close()
            return
        if self._phase == "busy" and self.cycle is not None:
            self.cycle.check_timeout(now)
        self._tick_handle = self.server.loop.call_later(self.server.tick, self._tick)
