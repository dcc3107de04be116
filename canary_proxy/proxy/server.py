"""The public port's state: the current config and its pools, the client connections, the
in-flight count, the batch that runs at the end of each loop iteration, and shutdown."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import ssl
import time
from collections.abc import Callable, Sequence

from ..config import Config, Upstream, format_duration
from ..metrics import Metrics, RouteSeries
from ..router import STABLE, random_bucket_source
from ..routes import Origin, Route, RouteTable
from ..tls import TlsError, read_ca, upstream_context
from .accesslog import AccessLog
from .client import ClientConnection
from .cycle import Cycle
from .exchange import Exchange, Runtime, Session, pick
from .headers import WS_CLOSE_GOING_AWAY_TO_CLIENT
from .limits import Limits
from .mirror import Mirrors
from .outlier import WINDOW, OutlierDetector
from .request import Request
from .upstream import UpstreamConnection, UpstreamPool

log = logging.getLogger(__name__)


def masked_close_frame(code: int) -> bytes:
    """A client-to-server WebSocket close frame (RFC 6455 5.3: a client must mask)."""
    mask = os.urandom(4)
    payload = code.to_bytes(2, "big")
    return b"\x88\x82" + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


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
        self.table: RouteTable[Runtime] | None = None  # swapped whole by apply_routes
        self.body_limits = False  # some route has a body limit of its own (see body_limit)
        self.fallback: Runtime | None = None  # --default-backend
        self._series: set[str] = set()  # routes whose metric series were created at zero
        self.pools: dict[str, UpstreamPool] = {}  # by URL (and CA bundle, for https)
        self._ca: dict[str, ssl.SSLContext] = {}  # upstream-ca contexts by content digest
        self.connections: set[ClientConnection] = set()
        self.websockets: set[Session] = set()
        self.mirrors = Mirrors(metrics)
        self.in_flight = 0  # requests in progress, WebSockets included
        self.closing = False
        self._changed = asyncio.Event()
        self._ready: list[Cycle] = []  # parsed requests, begun together once reads are done
        self._unflushed: list[ClientConnection] = []  # connections holding response bytes
        self._upstream_unflushed: list[UpstreamConnection] = []  # holding request heads
        self._finished: list[Session] = []  # to account: metrics, access log, in-flight count
        # With --workers: the series this batch counted in, flushed to their files at its end.
        self._touched: set[RouteSeries] | None = set() if metrics.shared else None
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

    def account_later(self, cycle: Session) -> None:
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
                for done in finished:
                    try:
                        done.account()
                    except Exception:
                        log.exception("accounting a request failed")
        finally:
            touched = self._touched
            if touched:  # enter and leave run only in here: a batch is never half flushed
                self.metrics.flush(touched)
                touched.clear()
            self._batch_due = False

    def protocol(self) -> ClientConnection:
        """For the public port: a TLS one when ``tls`` is set (--tls-cert), else plain."""
        return self.tls_protocol() if self.tls is not None else ClientConnection(self)

    def tls_protocol(self) -> ClientConnection:
        """For a TLS listener; called at accept, before the handshake, which counts as a
        connection from now on."""
        connection = ClientConnection(self)
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
        """One config, one catch-all route: the single-pair proxy."""
        self.apply_routes([Route.default(config)])

    def apply_routes(self, routes: Sequence[Route], *, fallback: Config | None = None) -> None:
        """Serve ``routes`` from now on: one table, swapped in one assignment. A route whose
        upstreams did not change keeps its pools (pools are shared by URL) and its outlier
        state; no other route's are touched."""
        previous = (
            {runtime.name: (route, runtime) for route, runtime in self.table.items} if self.table else {}
        )
        items = []
        for route in routes:
            before = previous.get(route.name)
            if before is not None and before[0] == route and route.config.upstream_ca is None:
                # Unchanged (a CA file is read again, as on every change): one of 1,000 routes
                # changed rebuilds one runtime, not 1,000.
                items.append((route, before[1]))
                continue
            previous_runtime = before[1] if before is not None else None
            runtime = self._runtime(route.name, route.config, previous_runtime, route.origin)
            if runtime is not None:
                items.append((route, runtime))
                if route.name not in self._series:  # once per route name: not per change
                    self._series.add(route.name)
                    self.metrics.init_data_plane(route.name)
        table = RouteTable(items).build()
        # Only routes with a body limit of their own make a request look its route up as
        # soon as its head is read; otherwise the proxy's limit applies, as it always did.
        self.body_limits = any(runtime.body_limit is not None for _, runtime in items)
        self.fallback = self._runtime("default-backend", fallback, None) if fallback is not None else None
        configs = [runtime.config for _, runtime in table.items]
        self.tick = min((_tick_for(self.limits, c) for c in configs), default=_tick_for(self.limits, None))
        self.table = table
        used = {id(p) for _, r in table.items for p in (r.stable, r.canary)}
        if self.fallback is not None:
            used.add(id(self.fallback.stable))
        for key in [k for k, p in self.pools.items() if id(p) not in used]:
            self.pools.pop(key).retire()

    def body_limit(self, request: Request) -> int:
        """The body limit of the route this request will take: its own (an Ingress's
        proxy-body-size) or the proxy's ``--max-body-size``; 0 = none."""
        runtime = pick(request, self.table, self.fallback) if self.table is not None else None
        if runtime is not None and runtime.body_limit is not None:
            return runtime.body_limit
        return self.limits.max_body_size

    def _runtime(
        self, name: str, config: Config, previous: Runtime | None, origin: Origin | None = None
    ) -> Runtime | None:
        try:
            ca = self._upstream_ca(config)
        except TlsError as exc:  # validated before, so only if the file changed since
            if previous is not None:
                log.error("route %s: upstream-ca: %s; keeping its current config", name, exc)
            else:
                log.error("route %s: upstream-ca: %s; not served", name, exc)
            return previous
        outlier = previous.outlier if previous is not None else OutlierDetector()
        if previous is None or previous.config.canary != config.canary or not config.canary_outlier_failures:
            outlier.reset()  # a new canary (or protection turned off) starts with a clean slate
        stable, canary = self._pool(config.stable, ca), self._pool(config.canary, ca)
        series = self.metrics.series(name, origin)  # an Ingress's route: its nginx series too
        body_limit = origin.body_limit if origin is not None else None
        redirect = origin is not None and origin.ssl_redirect  # its host has TLS: see Cycle._to_https
        return Runtime(
            config, stable, canary, name,
            https_redirect=redirect, series=series, outlier=outlier, body_limit=body_limit,
        )  # fmt: skip

    def _upstream_ca(self, config: Config) -> tuple[str, ssl.SSLContext] | None:
        """The client context for https upstreams, built once per distinct CA bundle content."""
        if config.upstream_ca is None:
            return None
        data = read_ca(config.upstream_ca)
        digest = hashlib.sha256(data).hexdigest()
        context = self._ca.get(digest)
        if context is None:
            context = self._ca[digest] = upstream_context(data, origin=config.upstream_ca)
        return digest, context

    def _pool(self, upstream: Upstream, ca: tuple[str, ssl.SSLContext] | None) -> UpstreamPool:
        key = f"{upstream.url} ca={ca[0]}" if upstream.tls and ca is not None else upstream.url
        pool = self.pools.get(key)
        if pool is None:
            context = ca[1] if upstream.tls and ca is not None else None
            pool = self.pools[key] = UpstreamPool(upstream, ssl_context=context)
            pool.on_stray = self._stray
        return pool

    def canary_ejected(self, runtime: Runtime) -> bool:
        now = time.monotonic()
        if runtime.outlier.expired(now):
            log.info("route %s: canary outlier cool-down over: the canary gets its weighted share again",
                     runtime.name)  # fmt: skip
        return runtime.outlier.ejected(now)

    def canary_failed(self, runtime: Runtime) -> None:
        """One connect failure to the canary: eject it when that crosses the threshold."""
        config = runtime.config
        threshold, cooldown = config.canary_outlier_failures, config.canary_outlier_cooldown
        if runtime.outlier.failure(time.monotonic(), threshold=threshold, cooldown=cooldown):
            self.metrics.outlier_ejections.labels(runtime.name).inc()
            log.warning(
                "canary ejected for %s: %d connect failures within %gs; its weighted share goes to stable",
                format_duration(cooldown),
                threshold,
                WINDOW,
                extra={"canary": config.canary.url, "route": runtime.name},
            )

    def _stray(self, conn: UpstreamConnection, detail: str) -> None:
        version = conn.version or STABLE
        self.metrics.upstream_errors.labels(conn.route, version, "protocol").inc()
        log.warning(
            "upstream %s (%s) sent %s; closed that connection", version, conn.pool.upstream.url, detail
        )

    # -- accounting -------------------------------------------------------------------------

    def enter(self, ex: Exchange) -> None:
        self.in_flight += 1
        series = ex.series
        assert series is not None  # a routed exchange
        series.enter(ex.version)
        if self._touched is not None:
            self._touched.add(series)

    def move(self, ex: Exchange, version: str, rule: str) -> None:
        series = ex.series
        assert series is not None
        series.move(ex.version, version)
        ex.version, ex.rule = version, rule
        if self._touched is not None:
            self._touched.add(series)

    def reject(self, ex: Exchange) -> None:
        self.metrics.count_rejected(ex.status, ex.method)
        if self.access_log is not None:
            self.access_log.write(ex, 0.0)

    def leave(self, ex: Exchange) -> None:
        seconds = time.monotonic() - ex.start
        series = ex.series
        assert series is not None
        series.leave(ex.version, ex.rule, ex.status, ex.method, seconds)
        if self._touched is not None:
            self._touched.add(series)
        if self.access_log is not None:
            self.access_log.write(ex, seconds)
        self.in_flight -= 1
        self._changed.set()

    def changed(self) -> None:
        self._changed.set()

    def websocket_opened(self, cycle: Session) -> None:
        self.websockets.add(cycle)
        self.metrics.websockets.labels(cycle.ex.route, cycle.ex.version).inc()
        self._changed.set()

    def websocket_closed(self, cycle: Session) -> None:
        if cycle in self.websockets:
            self.websockets.discard(cycle)
            self.metrics.websockets.labels(cycle.ex.route, cycle.ex.version).dec()
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
            cycle.go_away(WS_CLOSE_GOING_AWAY_TO_CLIENT, masked_close_frame(1001))

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
