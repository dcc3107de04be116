"""The data path: route each request once, stream both ways, map upstream errors to 502/504.

The exception ladder (aiohttp's own order): cancellation is re-raised (the client went away:
499); a connect failure is 502 (or a failover to stable); no response headers within
``upstream-timeout`` is 504; a reset or malformed answer before the headers is 502; anything
else is a logged 500. Once response bytes have gone out no error page is written: the
client connection is aborted so a truncated body can never pass for a complete one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .accesslog import AccessLog
from .config import Config, Upstream
from .metrics import Metrics
from .router import CANARY, STABLE, Decision, decide, random_bucket_source

log = logging.getLogger(__name__)

# RFC 9110 7.6.1 hop-by-hop fields, plus the legacy Proxy-Connection and Keep-Alive.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Replaced by what the proxy saw: it is the edge, clients must not be able to spoof these.
_REPLACED = frozenset({"x-forwarded-proto", "x-forwarded-host", "x-request-id", "expect"})
_WS_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
    }
)
# aiohttp's client adds these unless told not to; a proxy must not invent request headers.
_SKIP_AUTO = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})
_MAX_REQUEST_ID = 200


class UpstreamFailure(Exception):
    """Failed before any response byte went to the client; ``status`` is what we answer."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class Pool:
    """One keep-alive connection pool (a ClientSession) per upstream URL, created once."""

    upstream: Upstream
    session: aiohttp.ClientSession
    active: int = 0
    retired: bool = False


@dataclass(frozen=True, slots=True)
class Runtime:
    """What one request needs, swapped as a whole when the config changes."""

    config: Config
    stable: Pool
    canary: Pool
    timeout: aiohttp.ClientTimeout

    def pool(self, version: str) -> Pool:
        return self.canary if version == CANARY else self.stable


class Pools:
    """Upstream pools by URL. A pool dropped from the config is closed once it is idle."""

    def __init__(self) -> None:
        self._by_url: dict[str, Pool] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, upstream: Upstream) -> Pool:
        pool = self._by_url.get(upstream.url)
        if pool is None:
            pool = Pool(upstream, _new_session())
            self._by_url[upstream.url] = pool
        return pool

    def keep_only(self, urls: Iterable[str]) -> None:
        keep = set(urls)
        for url in [u for u in self._by_url if u not in keep]:
            pool = self._by_url.pop(url)
            pool.retired = True
            self.release_if_idle(pool)

    def release_if_idle(self, pool: Pool) -> None:
        if pool.retired and pool.active == 0 and not pool.session.closed:
            task = asyncio.get_running_loop().create_task(pool.session.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for pool in self._by_url.values():
            await pool.session.close()
        self._by_url.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def _new_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=0,  # no cap, like nginx: the upstream's own backlog is the limit
        keepalive_timeout=15,  # below common upstream idle timeouts; stale ones are retried
        ttl_dns_cache=10,  # Service DNS names rarely change; still follow them within seconds
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # relay bytes exactly as the upstream encoded them
        cookie_jar=aiohttp.DummyCookieJar(),  # never keep one user's cookies for another
        skip_auto_headers=_SKIP_AUTO,
    )


@dataclass(slots=True)
class Exchange:
    """Per-request facts gathered for the metrics and the access log."""

    start: float
    version: str
    rule: str
    request_id: str
    status: int = 0
    upstream_seconds: float | None = None
    bytes_out: int = 0
    started: bool = False  # response headers sent to the client


def new_request_id() -> str:
    return os.urandom(16).hex()


def _valid_request_id(value: str) -> bool:
    # Printable ASCII only: a client-chosen id must not inject into logs or headers.
    return 0 < len(value) <= _MAX_REQUEST_ID and value.isascii() and value.isprintable()


def connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def upstream_headers(
    request: web.BaseRequest, request_id: str, *, websocket: bool = False
) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones, with X-Forwarded-* and X-Request-Id set."""
    drop = HOP_BY_HOP | _REPLACED | connection_tokens(request.headers)
    if websocket:
        drop |= _WS_HANDSHAKE
    out: CIMultiDict[str] = CIMultiDict()
    forwarded_for: list[str] = []
    for name, value in request.headers.items():
        low = name.lower()
        if low == "x-forwarded-for":
            forwarded_for.append(value)
        elif low not in drop:
            out.add(name, value)
    forwarded_for.append(request.remote or "unknown")
    out["X-Forwarded-For"] = ", ".join(forwarded_for)
    out["X-Forwarded-Proto"] = "https" if request.secure else "http"
    host = request.headers.get("Host")
    if host is not None:
        out["X-Forwarded-Host"] = host
    out["X-Request-Id"] = request_id
    return out


def downstream_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    drop = HOP_BY_HOP | connection_tokens(upstream.headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.headers.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out


def request_target(raw_path: str) -> str:
    """Path and query byte for byte. An absolute-form target is routed by its path only, so
    its host is never contacted: this proxy forwards to the configured upstreams, nowhere else.
    """
    if raw_path.startswith("/"):
        return raw_path
    scheme_end = raw_path.find("://")
    if scheme_end < 0:
        return "/" + raw_path
    slash = raw_path.find("/", scheme_end + 3)
    query = raw_path.find("?", scheme_end + 3)
    if slash < 0 or (0 <= query < slash):
        rest = raw_path[query:] if query >= 0 else ""
        return "/" + rest
    return raw_path[slash:]


def is_websocket(request: web.BaseRequest) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket" and "upgrade" in connection_tokens(
        request.headers
    )


class Proxy:
    """The public-port handler. ``apply`` swaps the config; each request reads it once."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        access_log: AccessLog | None,
        draw: Callable[[], int] | None = None,
    ) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self.runtime: Runtime | None = None
        self.pools = Pools()
        self.websockets: set[web.WebSocketResponse] = set()
        self.in_flight = 0  # requests in the handler, WebSockets included
        self._changed = asyncio.Event()  # set whenever in_flight or the WebSocket set changes
        self.closing = False  # set during shutdown: answer with Connection: close
        self._draw = draw or random_bucket_source()

    def apply(self, config: Config) -> None:
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=config.upstream_connect_timeout,
            # Time between reads: bounds the wait for response headers, and a stalled body.
            sock_read=config.upstream_timeout,
        )
        stable, canary = self.pools.get(config.stable), self.pools.get(config.canary)
        self.runtime = Runtime(config, stable, canary, timeout)
        self.pools.keep_only((config.stable.url, config.canary.url))

    async def close(self) -> None:
        await self.pools.close()

    async def wait_http_idle(self, deadline: float) -> None:
        """Wait until only WebSockets are left in flight, or until the loop time ``deadline``."""
        loop = asyncio.get_running_loop()
        while self.in_flight > len(self.websockets):
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.warning("shutdown timeout: %d requests still in flight", self.in_flight)
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    async def close_websockets(self, code: int = aiohttp.WSCloseCode.GOING_AWAY) -> None:
        for ws in list(self.websockets):
            await ws.close(code=code, message=b"proxy shutting down")

    # -- the request path -------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        runtime = self.runtime
        if request.method == "CONNECT":
            return web.Response(
                status=405, text="405: CONNECT is not allowed\n", headers={"Connection": "close"}
            )
        if runtime is None:
            return web.Response(status=503, text="503: no config loaded yet\n")
        config = runtime.config
        decision = self._decide(config, request)
        rid = request.headers.get("X-Request-Id")
        ex = Exchange(
            start=time.monotonic(),
            version=decision.version,
            rule=decision.rule,
            request_id=rid if rid is not None and _valid_request_id(rid) else new_request_id(),
        )
        self._enter(ex)
        pool = runtime.pool(ex.version)
        pool.active += 1
        try:
            if is_websocket(request):
                return await self._websocket(request, runtime, decision, ex)
            return await self._http(request, runtime, decision, ex)
        except asyncio.CancelledError:
            if not ex.started:
                ex.status = 499  # nginx's code for a client that left before the response
            raise
        except UpstreamFailure as failure:
            ex.status = failure.status
            return self._error(runtime, decision, ex, failure.status, str(failure))
        except ConnectionResetError:
            # The client went away while we wrote to it (aiohttp's ClientConnectionResetError
            # is a ConnectionResetError): nothing to answer, and not worth a traceback.
            if not ex.started:
                ex.status = 499
            raise
        except Exception:
            if ex.started:
                log.exception("proxying failed after the response started; aborting")
                _abort(request)
                raise
            log.exception("proxying failed")
            ex.status = 500
            return self._error(runtime, decision, ex, 500, "internal proxy error")
        finally:
            pool.active -= 1
            self.pools.release_if_idle(pool)
            self._leave(ex, request)

    def _decide(self, config: Config, request: web.BaseRequest) -> Decision:
        headers = request.headers
        cookies = request.cookies if "Cookie" in headers else {}
        return decide(
            config,
            header=headers.get(config.canary_by_header) if config.canary_by_header else None,
            cookie=cookies.get(config.canary_by_cookie) if config.canary_by_cookie else None,
            sticky=cookies.get(config.sticky_cookie) if config.sticky_cookie else None,
            draw=self._draw,
        )

    def _enter(self, ex: Exchange) -> None:
        self.in_flight += 1
        self.metrics.in_flight.labels(ex.version).inc()

    def _leave(self, ex: Exchange, request: web.BaseRequest) -> None:
        seconds = time.monotonic() - ex.start
        m = self.metrics
        m.in_flight.labels(ex.version).dec()  # ex.version may have failed over; see _failover
        m.count_request(ex.version, ex.status, request.method, seconds)
        m.decisions.labels(ex.version, ex.rule).inc()
        if self.access_log is not None:
            self.access_log.write(request, ex, seconds)
        self.in_flight -= 1
        self._changed.set()

    def _response_headers(
        self, config: Config, decision: Decision, ex: Exchange, headers: CIMultiDict[str]
    ) -> CIMultiDict[str]:
        if config.version_header:
            headers[config.version_header] = ex.version
        headers["X-Request-Id"] = ex.request_id
        if decision.set_cookie and decision.bucket is not None:
            headers.add(
                "Set-Cookie",
                f"{config.sticky_cookie}={decision.bucket}; Path=/; "
                f"Max-Age={config.sticky_max_age}; HttpOnly; SameSite=Lax",
            )
        if self.closing:
            headers["Connection"] = "close"
        return headers

    def _error(
        self, runtime: Runtime, decision: Decision, ex: Exchange, status: int, detail: str
    ) -> web.Response:
        headers = self._response_headers(runtime.config, decision, ex, CIMultiDict())
        reason = {502: "Bad Gateway", 504: "Gateway Timeout"}.get(status, "Error")
        return web.Response(status=status, text=f"{status} {reason}: {detail}\n", headers=headers)

    # -- plain HTTP -----------------------------------------------------------------------

    async def _http(
        self, request: web.BaseRequest, runtime: Runtime, decision: Decision, ex: Exchange
    ) -> web.StreamResponse:
        expect = request.headers.get("Expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                ex.status = 417
                return self._error(runtime, decision, ex, 417, "unsupported expectation")
            if request.version >= (1, 1):
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        headers = upstream_headers(request, ex.request_id)
        body = request.content if request.body_exists else None
        target = request_target(request.raw_path)
        upstream = await self._open_with_failover(
            runtime,
            ex,
            lambda pool: pool.session.request(
                request.method,
                URL(pool.upstream.url + target, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=runtime.timeout,
            ),
        )
        try:
            return await self._relay(request, runtime, decision, ex, upstream)
        finally:
            upstream.release()

    async def _open_with_failover(
        self,
        runtime: Runtime,
        ex: Exchange,
        open_: Callable[[Pool], Any],
    ) -> Any:
        try:
            return await self._open(runtime, ex, open_)
        except UpstreamFailure as failure:
            config = runtime.config
            if not (failure.reason == "connect" and ex.version == CANARY and config.canary_failover):
                raise
        log.warning("canary unreachable, failing over to stable (request %s)", ex.request_id)
        self._move(ex, STABLE, "failover")
        return await self._open(runtime, ex, open_)

    def _move(self, ex: Exchange, version: str, rule: str) -> None:
        self.metrics.in_flight.labels(ex.version).dec()
        ex.version, ex.rule = version, rule
        self.metrics.in_flight.labels(version).inc()

    async def _open(self, runtime: Runtime, ex: Exchange, open_: Callable[[Pool], Any]) -> Any:
        """Connect and get response headers, or raise UpstreamFailure with the status to send."""
        pool = runtime.pool(ex.version)
        started = time.monotonic()
        try:
            result = await open_(pool)
        except aiohttp.WSServerHandshakeError:
            raise  # the upstream answered, but refused the upgrade: the caller relays its status
        except aiohttp.ConnectionTimeoutError as exc:
            raise self._failure(ex, 502, "connect", f"connect timeout to {pool.upstream.url}") from exc
        except aiohttp.ClientConnectorError as exc:
            raise self._failure(ex, 502, "connect", f"cannot connect to {pool.upstream.url}") from exc
        except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
            raise self._failure(ex, 504, "timeout", f"no response from {pool.upstream.url}") from exc
        except aiohttp.ClientResponseError as exc:
            raise self._failure(ex, 502, "protocol", f"bad response: {exc.message}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise self._failure(ex, 502, "reset", f"upstream closed the connection: {exc!r}") from exc
        ex.upstream_seconds = time.monotonic() - started
        return result

    def _failure(self, ex: Exchange, status: int, reason: str, detail: str) -> UpstreamFailure:
        self.metrics.upstream_errors.labels(ex.version, reason).inc()
        log.warning("upstream %s failed (%s): %s [request %s]", ex.version, reason, detail, ex.request_id)
        return UpstreamFailure(status, reason, detail)

    async def _relay(
        self,
        request: web.BaseRequest,
        runtime: Runtime,
        decision: Decision,
        ex: Exchange,
        upstream: aiohttp.ClientResponse,
    ) -> web.StreamResponse:
        headers = self._response_headers(runtime.config, decision, ex, downstream_headers(upstream))
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        ex.status = upstream.status
        await response.prepare(request)
        ex.started = True
        content = upstream.content
        while True:
            try:
                chunk = await content.readany()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                reason = "timeout" if isinstance(exc, TimeoutError) else "reset"
                self.metrics.upstream_errors.labels(ex.version, reason).inc()
                log.warning(
                    "upstream %s broke mid-body (%r); aborting the client connection",
                    ex.version,
                    exc,
                )
                _abort(request)
                return response
            if not chunk:
                break
            await response.write(chunk)
            ex.bytes_out += len(chunk)
        await response.write_eof()
        return response

    # -- WebSockets -----------------------------------------------------------------------

    async def _websocket(
        self, request: web.BaseRequest, runtime: Runtime, decision: Decision, ex: Exchange
    ) -> web.StreamResponse:
        headers = upstream_headers(request, ex.request_id, websocket=True)
        protocols = [
            p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
        ]
        target = request_target(request.raw_path)
        timeout = runtime.config.upstream_timeout

        async def connect(pool: Pool) -> aiohttp.ClientWebSocketResponse:
            async with asyncio.timeout(timeout):
                return await pool.session.ws_connect(
                    URL(pool.upstream.url + target, encoded=True),
                    headers=headers,
                    protocols=protocols,
                    max_msg_size=0,
                )

        try:
            upstream = await self._open_with_failover(runtime, ex, connect)
        except aiohttp.WSServerHandshakeError as exc:
            ex.status = exc.status if 400 <= exc.status < 600 else 502
            return self._error(runtime, decision, ex, ex.status, "upstream refused the WebSocket")
        response_headers = self._response_headers(runtime.config, decision, ex, CIMultiDict())
        ws = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            max_msg_size=0,
        )
        ws.headers.extend(response_headers)
        gauge = self.metrics.websockets.labels(ex.version)
        try:
            await ws.prepare(request)
            ex.status, ex.started = 101, True
            self.websockets.add(ws)
            self._changed.set()
            gauge.inc()
            await _splice(ws, upstream)
        finally:
            if ws in self.websockets:
                self.websockets.discard(ws)
                gauge.dec()
            await upstream.close()
        return ws


async def _pump(
    src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    async for msg in src:
        if msg.type == aiohttp.WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif msg.type == aiohttp.WSMsgType.BINARY:
            await dst.send_bytes(msg.data)


async def _splice(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    """Relay messages both ways until one side closes, then close the other with its code."""
    down = asyncio.ensure_future(_pump(upstream, client))
    up = asyncio.ensure_future(_pump(client, upstream))
    try:
        await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (down, up):
            task.cancel()
        await asyncio.gather(down, up, return_exceptions=True)
    if not client.closed:
        await client.close(code=upstream.close_code or aiohttp.WSCloseCode.OK)
    if not upstream.closed:
        await upstream.close(code=client.close_code or aiohttp.WSCloseCode.OK)


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
