"""One request's exchange: route it, relay it to an upstream connection and back, account it.

A Cycle talks to its client connection through ``Client`` and to the server through
``Proxy``, two narrow Protocols (exchange.py), the way an upstream connection talks to it
through ``ResponseSink``: no module here imports the others' classes. The exception ladder's
rules (which failure is retried, counted, answered how; opening a connection with failover)
are in failures.py; the Cycle keeps the states they move it through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Final

from ..router import CANARY, STABLE, Decision, mirrored
from .body import BodyRelay
from .exchange import (
    Client,
    Exchange,
    Proxy,
    Runtime,
    UpstreamFailure,
    decision_for,
    https_location,
    own_headers,
    pick,
    routed,
    unrouted,
)
from .failures import (
    body_failure,
    count_broken,
    count_failure,
    counted,
    error_page,
    no_route_page,
    open_upstream,
    redirect_page,
    retryable,
)
from .headers import (
    CHUNKED_BODY,
    NO_BODY,
    client_head,
    request_framing,
    simple_response,
    upstream_head,
)
from .request import Request
from .upstream import CHUNKED, UpstreamConnection, UpstreamPool

log = logging.getLogger(__name__)

_WRITE_NOW = 64 << 10  # a response body read this large is written at once, not batched


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

    # One per request: slots, so building one allocates no attribute dict.
    __slots__ = (
        "bad_status", "body", "body_framing", "client", "close_after", "decision", "ex",
        "expect_continue", "last_activity", "pool", "request", "retried", "reused", "routed",
        "runtime", "server", "state", "task", "timeout", "tried", "upstream", "watching",
        "websocket",
    )  # fmt: skip

    # What routing decided, set once by ``_route`` and read only once ``routed``: plain
    # attributes, not a record of their own, which would cost an allocation per request.
    runtime: Runtime
    decision: Decision
    ex: Exchange
    pool: UpstreamPool  # the routed pool; its ``active`` counts this request

    def __init__(self, client: Client, server: Proxy, request: Request) -> None:
        self.client = client
        self.server = server
        self.request = request
        self.state = _ROUTING
        self.routed = False
        self.task: asyncio.Task[None] | None = None  # only while opening a connection
        self.upstream: UpstreamConnection | None = None  # in use, not yet released
        self.tried: UpstreamConnection | None = None  # of the current attempt, for the retry rule
        self.reused = False  # the current attempt's connection came from the pool
        self.retried = False
        self.expect_continue = False
        self.watching = False  # the upstream timeout applies (checked by the connection's clock)
        self.timeout = 0.0
        self.last_activity = 0.0
        self.body_framing = NO_BODY  # of the response to the client (headers.client_head)
        self.close_after = False
        self.websocket = False
        # The request body's trip upstream; most requests have none, and pay nothing for it.
        self.body = BodyRelay(request, self) if request.has_body else None
        self.bad_status = 0  # set when the request's own body is malformed

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
            self.client.send_now(simple_response(405, b"405: CONNECT is not allowed\n", close=True))
            self.close_after = True
            self._finish()
            return
        table = self.server.table
        if table is None:
            body = b"503: no config loaded yet\n"
            self.client.send_now(simple_response(503, body, head=request.method == "HEAD"))
            self._finish()
            return
        runtime = table.only
        if runtime is None:
            runtime = pick(self.request, table, self.server.fallback)
            if runtime is None:
                self._no_route()
                return
        if runtime.https_redirect and not self.client.peer.secure and self._to_https():
            return
        self._route(runtime)
        if self.bad_status:  # malformed before we even started
            self._fail(body_failure(self.bad_status))
            return
        expect = request.lookup.get(b"expect")
        if expect is not None and expect.strip().lower() != b"100-continue":
            self._fail(UpstreamFailure(417, "client", "unsupported expectation"))
            return
        self.expect_continue = expect is not None
        self.websocket = request.upgrade
        self._acquire()

    def _no_route(self) -> None:
        """No route matches and there is no default backend: 404, counted unrouted."""
        self._answer_unrouted(404, "no-route", None)

    def _to_https(self) -> bool:
        """A plain-HTTP request to a TLS host: 308 to https, counted unrouted. False: none due."""
        location = https_location(self.request, self.client.peer)
        if location is not None:
            self._answer_unrouted(308, "https-redirect", location)
        return location is not None

    def _answer_unrouted(self, status: int, rule: str, location: bytes | None) -> None:
        """The proxy's own answer, which no upstream sees: a 404, or a 308 to ``location``."""
        request = self.request
        self.close_after = request.has_body and not request.body_done
        self.server.reject(unrouted(request, self.client.peer.client, status=status, rule=rule))
        close = self.close_after or self.client.draining or not request.keep_alive
        if location is None:
            self.client.send_now(no_route_page(request, close=close))
        else:
            self.client.send_now(redirect_page(request, location, close=close))
        self._finish()

    def _route(self, runtime: Runtime) -> None:
        request, server = self.request, self.server
        self.decision = decision = decision_for(request, runtime, server.draw)
        if runtime.canary_outlier_failures and self._ejected(runtime, decision):
            self.decision = decision = replace(decision, version=STABLE, rule="failover")
        self.ex = ex = routed(request, runtime, decision, self.client.peer.client)
        server.enter(ex)
        self.runtime = runtime
        self.pool = pool = runtime.pool(decision.version)
        self.routed = True
        pool.active += 1
        if runtime.mirror_buckets and mirrored(runtime.config, decision, server.draw) and not request.upgrade:
            self._start_mirror(runtime)

    def _ejected(self, runtime: Runtime, decision: Decision) -> bool:
        """The weight (or a sticky bucket) chose a canary that outlier detection ejected."""
        ejectable = decision.rule in ("weight", "sticky") and decision.version == CANARY
        return ejectable and self.server.canary_ejected(runtime)

    def _acquire(self) -> None:
        """Dispatch on a pooled connection now, or open one in a task."""
        upstream = self.runtime.pool(self.ex.version).take_idle()
        if upstream is not None:
            self._dispatch(upstream, True)
            return
        self.state = _CONNECTING
        self.task = self.server.loop.create_task(self._connect(self.runtime))

    def _resolve(self, error: UpstreamFailure | None) -> None:
        """The attempt in flight ended; anything reported after that is ignored."""
        if self.state != _WAITING:
            return
        self.state = _ROUTING
        try:
            if error is None:
                self._finish()
            else:
                self._settle(error)
        except Exception:
            self._crash()

    def _settle(self, error: UpstreamFailure) -> None:
        upstream = self.tried
        if upstream is not None and retryable(
            error, upstream, self.request.method, self.body, reused=self.reused, retried=self.retried
        ):
            self.retried = True
            if self.body is not None:
                self.body.detach()  # what arrives meanwhile is buffered for the new attempt
            log.info(
                "stale pooled connection to %s; retrying once on a fresh one", upstream.pool.upstream.url
            )
            self._acquire()
            return
        if not error.counted and error.reason != "client":
            count_failure(self.server.metrics, self.ex, error)
        self._fail(error)

    def _fail(self, failure: UpstreamFailure) -> None:
        """Answer an error page: nothing was sent to the client yet."""
        self.ex.status = failure.status
        self.close_after = self.close_after or (self.request.has_body and not self.request.body_done)
        self._send_error(failure.status, str(failure))
        self._finish()

    def _crash(self) -> None:
        """A bug: a logged 500, or an aborted client connection once bytes went out."""
        self._drop_upstream()
        if self.routed and self.ex.started:
            log.exception("proxying failed after the response started; aborting")
            self.client.abort()
        else:
            log.exception("proxying failed")
            if self.routed:
                self.ex.status = 500
                self._send_error(500, "internal proxy error")
        self.close_after = True
        self._finish()

    def _finish(self) -> None:
        if self.state == _DONE:
            return
        self.state = _DONE
        self.watching = False  # the timer: nothing left to time out
        if self.routed:
            self.server.account_later(self)  # after the response is written: see run_batch
        self.client.cycle_done(not self.request.keep_alive or self.close_after)  # or draining: it knows

    def account(self) -> None:
        if not self.routed:  # answered before routing
            return
        ex, server = self.ex, self.server
        if self.websocket:  # only a WebSocket is ever among the server's open ones
            server.websocket_closed(self)
        self.pool.leave()
        if self.body is not None:
            ex.bytes_in = self.body.bytes_in
        server.leave(ex)

    def _start_mirror(self, runtime: Runtime) -> None:
        request = self.request
        head = self._upstream_head(runtime.canary, False)
        copy = self.server.mirrors.begin(
            runtime.canary, runtime.config, runtime.name, request.method, head,
            length=request.content_length, chunked=request.chunked,
        )  # fmt: skip
        if self.body is not None:  # else the copy went at once (begin returned None)
            self.body.mirror = copy

    def _dispatch(self, upstream: UpstreamConnection, reused: bool) -> None:
        """Send the head (and what body there is) on ``upstream``; the upstream callbacks follow."""
        if self.bad_status:  # the body turned out malformed while we connected
            upstream.pool.release(upstream)
            self._fail(body_failure(self.bad_status))
            return
        self.state = _WAITING
        self.upstream = self.tried = upstream
        self.reused = reused
        request, ex = self.request, self.ex
        framing = CHUNKED if request.chunked else request.content_length or 0
        upstream.start(self, framing, self.websocket)
        upstream.version, upstream.route = ex.version, ex.route
        self.server.hold_upstream(upstream, self._upstream_head(upstream.pool, True))
        if self.expect_continue and request.version == "1.1" and not request.body_done:
            self.client.send_now(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.body is not None:
            self.body.attach(upstream, reused=reused, retried=self.retried)
            self.client.resume_reading("body")
        self.timeout = self.runtime.upstream_timeout  # the clock: see check_timeout
        self.last_activity = time.monotonic()
        self.watching = True

    # -- opening a connection: the one part that awaits ---------------------------------

    async def _connect(self, runtime: Runtime) -> None:
        # A client that leaves cancels this task; ``client_gone`` has finished the cycle then.
        try:
            upstream, reused = await open_upstream(self.server, runtime, self.ex)
            self.task = None
            self._dispatch(upstream, reused)
        except UpstreamFailure as failure:
            self.task = None
            self._fail(failure)
        except Exception:
            self.task = None
            self._crash()

    # -- the request head and body, upstream ----------------------------------------------

    def _upstream_head(self, pool: UpstreamPool, framing: bool) -> bytes:
        """The request head for ``pool``'s upstream; open (no framing, no blank line) if not
        ``framing``: a mirror copy adds its own."""
        request = self.request
        lookup = request.lookup
        return upstream_head(
            request.method, request.url, request.headers, lookup.get(b"host"), pool.host_header,
            self.client.peer, self.ex.request_id,
            request_framing(request.chunked, request.content_length) if framing else None,
            lookup[b"upgrade"] if self.websocket else None,
        )  # fmt: skip

    # -- upstream callbacks (ResponseSink) ------------------------------------------------

    def on_response_head(self, upstream: UpstreamConnection) -> None:
        ex = self.ex
        self.last_activity = now = time.monotonic()
        ex.upstream_seconds = now - ex.start
        ex.status = upstream.status
        if self.request.method == "HEAD":
            # llhttp cannot be told this response has no body: give the connection a fresh
            # parser and finish now; the Content-Length describes the GET body, not this one.
            upstream.head_response_done()
            self.client.send(self._client_head(upstream))
            ex.started = True
            self.on_response_complete()
            return
        if self.websocket and upstream.status != 101:
            self.close_after = True  # refused: our parser is past the upgrade, start afresh
        self.client.send(self._client_head(upstream))
        ex.started = True

    def on_response_body(self, data: bytes) -> None:
        self.ex.bytes_out += len(data)
        self.last_activity = time.monotonic()
        if self.body_framing == CHUNKED_BODY:
            self.client.send(b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.client.send(data)
        if len(data) >= _WRITE_NOW:
            # A large body can arrive as several reads in one loop iteration (libuv reads on
            # while data is there): held until the batch, a 1 MiB response went out as one
            # writev the client socket could not take, with no backpressure in between.
            self.client.flush()

    def on_response_complete(self) -> None:
        upstream = self.upstream
        if self.body_framing == CHUNKED_BODY:
            self.client.send(b"0\r\n\r\n")
        if upstream is not None:
            self.upstream = None
            if self.request.has_body and not self.request.body_done:
                # Answered before the whole body arrived: the client is still sending it,
                # and its connection ends with this response (the upstream's is not reused).
                self.close_after = True
            upstream.pool.release(upstream)
        self._resolve(None)

    def on_upstream_upgraded(self, rest: bytes) -> None:
        """The upstream switched protocols: from here on, splice raw bytes both ways."""
        upstream = self.upstream
        if upstream is None:
            return
        self.watching = False  # a WebSocket has no upstream timeout
        self.client.tunnel = upstream
        self.server.websocket_opened(self)
        if rest:
            self.on_upstream_raw(rest)
        early = self.request.upgrade_rest
        if early:
            upstream.write(early)

    def on_upstream_raw(self, data: bytes) -> None:
        self.ex.bytes_out += len(data)
        self.client.send_now(data)

    def on_upstream_error(self, reason: str, detail: str) -> None:
        self.upstream = None
        if reason == "closed":  # an upgraded connection ended: that is the end of the session
            self.close_after = True
            self.server.websocket_closed(self)
            self._resolve(None)
            return
        if self.ex.started:
            self._mid_body_failure(reason, detail)
            return
        # Counted by _settle unless it retries: a stale pooled connection is no upstream error.
        self._resolve(UpstreamFailure(502, reason, detail))

    def on_upstream_writable(self, writable: bool) -> None:
        if writable:
            self.client.resume_reading("upstream")
        else:
            self.client.pause_reading("upstream")

    # -- client side ------------------------------------------------------------------------

    def client_writable(self, writable: bool) -> None:
        upstream = self.upstream if self.upstream is not None else self.client.tunnel
        if upstream is None or upstream.transport is None:
            return
        if writable:
            upstream.transport.resume_reading()
        else:
            upstream.transport.pause_reading()

    def bad_body(self, status: int) -> None:
        """The client's body turned out malformed mid-stream: the upstream must not take an
        incomplete request for a whole one, so its connection is aborted."""
        log.debug("rejected the request body from %s with %d", self.client.peer.client, status)
        self._drop_upstream()
        self.close_after = True
        self.bad_status = status
        self.client.pause_reading("bad")
        self._resolve(body_failure(status))

    def client_gone(self) -> None:
        if self.websocket and self.client.tunnel is not None:
            self.client.tunnel.close()
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
        if self.routed and not self.ex.started:
            self.ex.status = 499  # nginx's code for a client that left before the response
        self.close_after = True
        self._finish()

    def _client_head(self, upstream: UpstreamConnection) -> bytes:
        request = self.request
        close = self.close_after or self.client.draining or not request.keep_alive
        head, self.body_framing, close = client_head(
            upstream.status, upstream.reason, upstream.headers, request.method == "HEAD",
            request.version == "1.1", close, own_headers(self.runtime, self.decision, self.ex),
        )  # fmt: skip
        self.close_after = self.close_after or close
        return head

    def _send_error(self, status: int, detail: str) -> None:
        request = self.request
        close = self.close_after or self.client.draining or not request.keep_alive
        own = own_headers(self.runtime, self.decision, self.ex)
        self.client.send_now(error_page(status, detail, own, close=close, head=request.method == "HEAD"))

    def _mid_body_failure(self, reason: str, detail: str) -> None:
        count_broken(self.server.metrics, self.ex, reason, detail)
        self.client.abort()
        self.close_after = True
        self._resolve(None)

    def _drop_upstream(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()

    # -- WebSockets -------------------------------------------------------------------------

    def go_away(self, to_client: bytes, to_upstream: bytes) -> None:
        """Shutting down: send each end of this WebSocket its close frame, and close both."""
        tunnel, self.client.tunnel = self.client.tunnel, None  # stop relaying the client's own
        self.client.send_now(to_client)
        if tunnel is not None:
            tunnel.write(to_upstream)
            tunnel.close()
        self.client.close()

    # -- timeouts -------------------------------------------------------------------------

    def check_timeout(self, now: float) -> None:
        """No response head, or no body data, for ``upstream-timeout``: 504 or an abort."""
        timeout = self.timeout
        if not self.watching or now - self.last_activity < timeout:
            return
        self.watching = False
        self._drop_upstream()
        if self.ex.started:
            self._mid_body_failure("timeout", f"no data for {timeout:g}s")
        else:
            detail = f"no response within {timeout:g}s"
            self._resolve(counted(self.server.metrics, self.ex, 504, "timeout", detail))
