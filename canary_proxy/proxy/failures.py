"""The exception ladder's rules: opening an upstream connection (with the canary's failover
to stable), which failures are retried, how each is counted and logged, and the error pages.

A Cycle (cycle.py) owns the states and calls these; they hold none. The ladder: a client
that leaves cancels its request (499 if nothing was sent); a connect failure is 502 (or a
failover to stable); no response headers within ``upstream-timeout`` is 504; a reset or
malformed answer before the headers is 502; an unexpected bug is a logged 500. Once
response bytes went out no error page is written: the client connection is aborted, so a
truncated body never poses as a complete one.
"""

from __future__ import annotations

import logging
from typing import Final, Protocol

from ..metrics import Metrics
from ..router import CANARY, STABLE
from .body import BodyRelay
from .exchange import Exchange, Runtime, UpstreamFailure
from .headers import simple_response
from .request import Request
from .upstream import IDEMPOTENT, ConnectFailed, UpstreamConnection, UpstreamPool

log = logging.getLogger(__name__)

_BODY_ERRORS: Final = {400: "malformed request body", 413: "request body too large"}


class Failover(Protocol):
    """What opening a connection needs of the server: its metrics, and the canary's state."""

    metrics: Metrics

    def canary_failed(self, runtime: Runtime) -> None: ...
    def move(self, ex: Exchange, version: str, rule: str) -> None: ...


async def open_upstream(server: Failover, runtime: Runtime, ex: Exchange) -> tuple[UpstreamConnection, bool]:
    """A connection to ``ex``'s version, pooled (True) or new; a canary that cannot be
    reached fails over to stable (``ex`` moves) if the route allows it. Raises a counted
    UpstreamFailure."""
    try:
        return await _open(server, runtime, runtime.pool(ex.version), ex)
    except UpstreamFailure as failure:
        config = runtime.config
        if failure.reason == "connect" and ex.version == CANARY:
            server.canary_failed(runtime)
        if not (failure.reason == "connect" and ex.version == CANARY and config.canary_failover):
            raise
    log.warning("canary unreachable, failing over to stable (request %s)", ex.request_id)
    server.move(ex, STABLE, "failover")
    return await _open(server, runtime, runtime.pool(STABLE), ex)


async def _open(
    server: Failover, runtime: Runtime, pool: UpstreamPool, ex: Exchange
) -> tuple[UpstreamConnection, bool]:
    upstream = pool.take_idle()
    if upstream is not None:
        return upstream, True
    try:
        return await pool.connect(runtime.config.upstream_connect_timeout), False
    except ConnectFailed as exc:
        raise counted(server.metrics, ex, 502, "connect", str(exc)) from None


def retryable(
    failure: UpstreamFailure, upstream: UpstreamConnection, method: str, body: BodyRelay | None, *,
    reused: bool, retried: bool,
) -> bool:  # fmt: skip
    """A pooled connection the upstream had closed: retry once, when it is safe to:
    idempotent methods, and requests none of whose body has been sent yet; and only if
    the body can be sent again in full (none sent yet, or all of it kept for a replay)."""
    safe = method in IDEMPOTENT or body is None or body.forwarded == 0
    whole = body is None or body.whole
    stale = failure.reason == "reset" and reused and not retried and not upstream.got_bytes
    return stale and safe and whole


def counted(metrics: Metrics, ex: Exchange, status: int, reason: str, detail: str) -> UpstreamFailure:
    """A failure of the upstream's, counted and logged as it is made."""
    failure = UpstreamFailure(status, reason, detail, counted=True)
    count_failure(metrics, ex, failure)
    return failure


def count_failure(metrics: Metrics, ex: Exchange, failure: UpstreamFailure) -> None:
    metrics.upstream_errors.labels(ex.route, ex.version, failure.reason).inc()
    log.warning(
        "upstream %s failed (%s): %s [request %s]", ex.version, failure.reason, failure, ex.request_id
    )


def count_broken(metrics: Metrics, ex: Exchange, reason: str, detail: str) -> None:
    """The upstream failed after the response started: the client connection is aborted."""
    metrics.upstream_errors.labels(ex.route, ex.version, reason).inc()
    log.warning(
        "upstream %s broke mid-body (%s: %s); aborting the client connection", ex.version, reason, detail
    )


def body_failure(status: int) -> UpstreamFailure:
    """The client's own body was malformed (400) or too large (413)."""
    return UpstreamFailure(status, "client", _BODY_ERRORS.get(status, "bad request body"))


def error_page(status: int, detail: str, own: bytes, *, close: bool, head: bool) -> bytes:
    """The proxy's answer to a failure, with its own fields (version, request id, cookie)."""
    return simple_response(status, f"{status}: {detail}\n".encode(), extra=own, close=close, head=head)


def no_route_page(request: Request, *, close: bool) -> bytes:
    """404: no route matches the request and there is no default backend."""
    host = (request.lookup.get(b"host") or b"").decode("latin-1")
    body = f"404: no route for host {host or '(none)'} path {request.url.decode('latin-1')}\n"
    return simple_response(404, body.encode(), close=close, head=request.method == "HEAD")


def redirect_page(request: Request, location: bytes, *, close: bool) -> bytes:
    """308 to ``location`` (https), as ingress-nginx's ssl-redirect answers."""
    extra = b"Location: %s\r\n" % location
    return simple_response(
        308, b"308: %s\n" % location, extra=extra, close=close, head=request.method == "HEAD"
    )
