"""Traffic mirroring: fire-and-forget copies of stable requests, sent to the canary.

A copy is the head the proxy sends stable, marked ``X-Canary-Mirror: 1`` (so the canary can
tell shadow traffic from real, e.g. to skip side effects), with the same ``X-Request-Id``,
and the whole body (at most ``canary-mirror-max-body``, collected as the client sends it and
then sent with a Content-Length). It goes on a connection of its own from the canary's pool,
in a task of its own, under its own deadline (``canary-mirror-timeout``, connect included);
at most ``canary-mirror-max-in-flight`` copies run at once, and the rest are skipped.

Nothing the client waits for depends on a copy: the client's request never awaits it, its
body is only appended to a list on the way to stable, and the canary's answer is read and
thrown away. A slow or dead canary costs at most the bounded copies in flight.

Copies are counted in ``mirror_requests_total{code}`` (the canary's status, ``error`` or
``timeout``) and timed in ``mirror_request_duration_seconds``, never in ``requests_total``:
a rollout's ``mirror`` step judges the canary on them before any user is routed to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

from ..config import Config
from ..metrics import Metrics
from .upstream import IDEMPOTENT, ConnectFailed, UpstreamConnection, UpstreamPool

log = logging.getLogger(__name__)

MIRROR_HEADER: Final = b"X-Canary-Mirror: 1\r\n"


class _Failed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason  # the upstream module's reasons: reset, protocol, closed, ...


class _Answer:
    """The ResponseSink of one copy: waits for the canary's whole answer and discards it."""

    __slots__ = ("conn", "done", "head_only")

    def __init__(self, conn: UpstreamConnection, done: asyncio.Future[int], *, head_only: bool) -> None:
        self.conn = conn
        self.done = done
        self.head_only = head_only

    def on_response_head(self, conn: UpstreamConnection) -> None:
        if self.head_only:  # HEAD: the Content-Length describes a body that will not come
            conn.head_response_done()
            conn.sink = None
            self.on_response_complete()

    def on_response_body(self, data: bytes) -> None:
        pass

    def on_response_complete(self) -> None:
        if not self.done.done():
            self.done.set_result(self.conn.status)

    def on_upstream_upgraded(self, rest: bytes) -> None:  # never asked for: the connection fails it
        self.conn.abort()
        self.on_upstream_error("protocol", "unexpected 101 from the canary")

    def on_upstream_raw(self, data: bytes) -> None:
        pass

    def on_upstream_error(self, reason: str, detail: str) -> None:
        if not self.done.done():
            self.done.set_exception(_Failed(reason, detail))

    def on_upstream_writable(self, writable: bool) -> None:
        pass  # the body is at most canary-mirror-max-body, written at once


class Copy:
    """One request picked for mirroring: collects its body, then hands it to ``Mirrors``."""

    __slots__ = (
        "dropped", "framed", "head", "limit", "max_in_flight", "method", "mirrors", "parts", "pool",
        "route", "size", "timeout",
    )  # fmt: skip

    def __init__(
        self,
        mirrors: Mirrors,
        pool: UpstreamPool,
        config: Config,
        route: str,
        method: str,
        head: bytes,
        *,
        framed: bool,
    ) -> None:
        self.mirrors = mirrors
        self.pool = pool
        self.route = route  # the route label its metrics carry
        self.timeout = config.canary_mirror_timeout
        self.limit = config.canary_mirror_max_body
        self.max_in_flight = config.canary_mirror_max_in_flight
        self.method = method
        self.head = head
        self.framed = framed  # the request had a Content-Length or a chunked body
        self.parts: list[bytes] = []
        self.size = 0
        self.dropped = False

    def feed(self, data: bytes) -> None:
        """A piece of the request body as it goes to stable; ``b""`` ends the body."""
        if self.dropped:
            return
        if not data:
            self.dropped = True  # launched: later calls (none expected) are ignored
            self.mirrors.launch(self, b"".join(self.parts))
            self.parts = []
            return
        self.size += len(data)
        if self.size > self.limit:  # a chunked body that turned out too large
            self.dropped = True
            self.parts = []
            self.mirrors.skip("body-too-large")
            return
        self.parts.append(data)


class Mirrors:
    """The copies of one process: the in-flight bound, the tasks, and their accounting."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.in_flight = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def begin(
        self,
        pool: UpstreamPool,
        config: Config,
        route: str,
        method: str,
        head: bytes,
        *,
        length: int | None,
        chunked: bool,
    ) -> Copy | None:
        """Start copying a request picked for mirroring. ``head`` is the request head as sent
        upstream, without framing fields and the blank line; ``length`` its Content-Length.
        The caller feeds the body to the Copy returned; a request without a body is launched
        at once (None returned). A declared length over the limit is skipped at once."""
        if length is not None and length > config.canary_mirror_max_body:
            self.skip("body-too-large")
            return None
        copy = Copy(self, pool, config, route, method, head, framed=chunked or length is not None)
        if not (chunked or length):
            self.launch(copy, b"")
            return None
        return copy

    def skip(self, reason: str) -> None:
        self.metrics.mirror_skipped.labels(reason).inc()

    def launch(self, copy: Copy, body: bytes) -> None:
        if self.in_flight >= copy.max_in_flight:
            self.skip("in-flight-limit")
            return
        self.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._send(copy, body))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, copy: Copy, body: bytes) -> None:
        pool, start = copy.pool, time.monotonic()
        pool.active += 1
        code = "error"
        try:
            async with asyncio.timeout(copy.timeout):
                code = str(await self._exchange(copy, body))
        except TimeoutError:
            code = "timeout"
            log.debug("mirror copy to %s timed out after %gs", pool.upstream.url, copy.timeout)
        except (_Failed, ConnectFailed) as exc:
            log.debug("mirror copy to %s failed: %s", pool.upstream.url, exc)
        finally:
            self.in_flight -= 1
            pool.leave()
        self.metrics.count_mirror(copy.route, code, time.monotonic() - start)

    async def _exchange(self, copy: Copy, body: bytes) -> int:
        """The canary's status. A pooled connection the canary had closed is retried once on
        a fresh one, when that is safe (as for client requests: the whole body is resent)."""
        pool = copy.pool
        safe = copy.method in IDEMPOTENT or not body
        framing = b"Content-Length: %d\r\n" % len(body) if copy.framed else b""
        head = copy.head + MIRROR_HEADER + framing + b"\r\n"
        conn = pool.take_idle()
        reused = conn is not None
        while True:
            if conn is None:
                conn = await pool.connect(copy.timeout)
            done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            conn.start(_Answer(conn, done, head_only=copy.method == "HEAD"), framing=len(body))
            conn.hold(head)
            conn.write_body(body)
            try:
                status = await done
            except _Failed as failed:
                stale = failed.reason == "reset" and reused and not conn.got_bytes
                conn.abort()
                if not (stale and safe):
                    raise
                conn, reused = None, False
                continue
            except BaseException:  # timed out or cancelled: the connection is mid-exchange
                conn.abort()
                raise
            pool.release(conn)
            return status

    def cancel(self) -> None:
        """Shutting down: copies are fire-and-forget, so nothing waits for them."""
        for task in list(self.tasks):
            task.cancel()
