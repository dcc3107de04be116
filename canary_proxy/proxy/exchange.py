"""The records of one request's exchange, the Cycle's two views (of its client connection,
of the server), and the pure steps of routing it: which route's runtime takes it, which
version, and the headers the proxy adds to its response. No I/O here."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from ..config import Config
from ..metrics import Metrics, RouteSeries
from ..router import CANARY, DEFAULT_ROUTE, STABLE, UNROUTED, Decision, decide
from ..routes import RouteTable
from .headers import Peer, cookie_value, new_request_id, request_target, valid_request_id
from .mirror import Mirrors
from .outlier import OutlierDetector
from .request import Request
from .upstream import UpstreamConnection, UpstreamPool


class UpstreamFailure(Exception):
    """Failed before any response byte went to the client; ``status`` is what we answer."""

    def __init__(self, status: int, reason: str, detail: str, *, counted: bool = False) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.counted = counted  # already in upstream_errors_total and the log


_SHARED: dict[Any, Any] = {}  # derived from configs only: bounded by the routes' values


def _shared(key: Any, value: Any = None) -> Any:
    """One object for each value (``value``, or ``key`` itself), whichever route asks."""
    if len(_SHARED) > 10_000:  # config churn over a long life: start over rather than grow
        _SHARED.clear()
    return _SHARED.setdefault(key, key if value is None else value)


_COPIED: Final = (
    "sticky_cookie", "canary_buckets", "canary_by_header", "canary_by_header_value", "header_regex",
    "canary_by_cookie", "canary_outlier_failures", "mirror_buckets", "upstream_timeout",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Runtime:
    """What a request on one route needs, rebuilt when the config changes (its pools and its
    outlier state are kept while its upstreams stay the same)."""

    config: Config
    stable: UpstreamPool
    canary: UpstreamPool
    name: str = DEFAULT_ROUTE  # the route's, and its metrics' ``route`` label
    https_redirect: bool = False  # its Ingress host has TLS: plain HTTP gets a 308 (https_location)
    series: RouteSeries | None = None  # its metrics' children (ProxyServer sets them)
    outlier: OutlierDetector = field(default_factory=OutlierDetector)  # the canary's connect failures
    body_limit: int | None = None  # an Ingress's proxy-body-size (0: none); None: the proxy's
    # The proxy's own response fields that depend only on the config, encoded once here
    # rather than once per response (see own_headers).
    version_lines: dict[str, bytes] = field(init=False, repr=False, compare=False)
    cookie_start: bytes = field(init=False, repr=False, compare=False)
    cookie_end: bytes = field(init=False, repr=False, compare=False)
    header_key: bytes = field(init=False, repr=False, compare=False)  # canary-by-header, lower-cased
    # The config values each request reads (router.Rules, and _route's), copied here: with
    # traffic over 1,000 routes the route's objects are cold on every request, and the
    # Config's values are spread over several more cache lines than these.
    sticky_cookie: str = field(init=False, repr=False, compare=False)
    canary_buckets: int = field(init=False, repr=False, compare=False)
    canary_by_header: str | None = field(init=False, repr=False, compare=False)
    canary_by_header_value: str | None = field(init=False, repr=False, compare=False)
    header_regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    canary_by_cookie: str | None = field(init=False, repr=False, compare=False)
    canary_outlier_failures: int = field(init=False, repr=False, compare=False)
    mirror_buckets: int = field(init=False, repr=False, compare=False)
    upstream_timeout: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        config = self.config
        header = config.version_header.encode()
        lines = {v: b"%s: %s\r\n" % (header, v.encode()) if header else b"" for v in (STABLE, CANARY)}
        # frozen: set once, here. Shared by every route that derives the same value (most
        # keep the default header and cookie names): with traffic over 1,000 routes, each
        # object of the route's own is a cache miss on every request.
        object.__setattr__(self, "version_lines", _shared(("lines", header), lines))
        object.__setattr__(self, "cookie_start", _shared(b"Set-Cookie: %s=" % config.sticky_cookie.encode()))
        end = b"; Path=/; Max-Age=%d; HttpOnly; SameSite=Lax\r\n" % config.sticky_max_age
        object.__setattr__(self, "cookie_end", _shared(end))
        object.__setattr__(self, "header_key", _shared((config.canary_by_header or "").lower().encode()))
        for name in _COPIED:
            object.__setattr__(self, name, getattr(config, name))

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
    route: str = UNROUTED
    series: RouteSeries | None = None  # the route's metric children; None: answered unrouted
    status: int = 0
    upstream_seconds: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    started: bool = False  # response headers sent to the client


class Client(Protocol):
    """What a Cycle needs of its client connection."""

    peer: Peer
    tunnel: UpstreamConnection | None  # after a WebSocket upgrade: raw bytes both ways

    @property
    def draining(self) -> bool: ...
    def send(self, *parts: bytes) -> None: ...
    def send_now(self, data: bytes) -> None: ...
    def flush(self) -> None: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...
    def cycle_done(self, close: bool) -> None: ...
    def pause_reading(self, reason: str) -> None: ...
    def resume_reading(self, reason: str) -> None: ...


class Session(Protocol):
    """What the server keeps of a Cycle: accounted once done; told to go if a WebSocket."""

    ex: Exchange

    def account(self) -> None: ...
    def go_away(self, to_client: bytes, to_upstream: bytes) -> None: ...


class Proxy(Protocol):
    """What a Cycle needs of the server: the config, the pools, accounting and batching."""

    table: RouteTable[Runtime] | None  # None until a config is loaded
    fallback: Runtime | None  # --default-backend: takes what no route matches
    metrics: Metrics
    mirrors: Mirrors
    draw: Callable[[], int]

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    def hold_upstream(self, upstream: UpstreamConnection, head: bytes) -> None: ...
    def account_later(self, cycle: Session) -> None: ...
    def enter(self, ex: Exchange) -> None: ...
    def move(self, ex: Exchange, version: str, rule: str) -> None: ...
    def leave(self, ex: Exchange) -> None: ...
    def canary_ejected(self, runtime: Runtime) -> bool: ...
    def canary_failed(self, runtime: Runtime) -> None: ...
    def reject(self, ex: Exchange) -> None: ...
    def websocket_opened(self, cycle: Session) -> None: ...
    def websocket_closed(self, cycle: Session) -> None: ...


def unrouted(request: Request | None, client: str, *, status: int, rule: str) -> Exchange:
    """A request the proxy answered itself, before any route took it (malformed, no route):
    counted with ``version="none"`` and logged like any other."""
    return Exchange(
        start=time.monotonic(),
        method=request.method if request is not None else "",
        path=request.url.decode("latin-1") if request is not None else "",
        client=client,
        version=UNROUTED,
        rule=rule,
        request_id=new_request_id(),
        status=status,
    )


def routed(request: Request, runtime: Runtime, decision: Decision, client: str) -> Exchange:
    """The Exchange of a request ``runtime`` took: its X-Request-Id if valid, else a new one."""
    rid = request.lookup.get(b"x-request-id")
    request_id = rid.decode("ascii") if rid is not None and valid_request_id(rid) else new_request_id()
    # Positional: Exchange's field order (start, method, path, client, version, rule,
    # request_id, route, series); keywords would cost more than the record itself.
    return Exchange(
        time.monotonic(), request.method, request.url.decode("latin-1"), client,
        decision.version, decision.rule, request_id, runtime.name, runtime.series,
    )  # fmt: skip


def pick(request: Request, table: RouteTable[Runtime], fallback: Runtime | None) -> Runtime | None:
    """The runtime of the route for this request's Host and path (see routes.py), or the
    default backend's, or None: no route."""
    url = request.url
    target = url if url[:1] == b"/" else request_target(url)
    found = table.value_for(request.lookup.get(b"host"), target)
    return found if found is not None else fallback


def https_location(request: Request, peer: Peer) -> bytes | None:
    """Where a plain-HTTP request to a route with ``https_redirect`` goes: ``https://HOST``
    (the Host without its port: the public HTTPS port is 443) and the original path and
    query, as ingress-nginx's ssl-redirect. None: no redirect, for a request without Host,
    or one a trusted proxy (--trust-forwarded-from) says came over https already."""
    lookup = request.lookup
    if peer.trusted and (lookup.get(b"x-forwarded-proto") or b"").strip().lower() == b"https":
        return None
    host = lookup.get(b"host") or b""
    if host.startswith(b"["):  # an IPv6 literal: [::1]:8080
        host = host[: host.find(b"]") + 1]
    else:
        host = host.partition(b":")[0]
    target = request_target(request.url)
    if not host or target == b"*":
        return None
    return b"https://" + host + target


def decision_for(request: Request, runtime: Runtime, draw: Callable[[], int]) -> Decision:
    """Stable or canary for this request, by the route's rules (see router.decide)."""
    lookup = request.lookup
    header = None
    if runtime.header_key:
        raw = lookup.get(runtime.header_key)
        header = raw.decode("latin-1") if raw is not None else None
    cookies = lookup.get(b"cookie")
    if cookies is None:  # a first visit: no cookie to look into
        return decide(runtime, header=header, cookie=None, sticky=None, draw=draw)
    return decide(
        runtime,
        header=header,
        cookie=cookie_value(cookies, runtime.canary_by_cookie) if runtime.canary_by_cookie else None,
        sticky=cookie_value(cookies, runtime.sticky_cookie),
        draw=draw,
    )


def own_headers(runtime: Runtime, decision: Decision, ex: Exchange) -> bytes:
    """The fields the proxy adds to a response: the version (if the route's config names a
    header for it), the request id, a sticky cookie."""
    own = b"%sX-Request-Id: %s\r\n" % (runtime.version_lines[ex.version], ex.request_id.encode())
    if decision.set_cookie and decision.bucket is not None:
        own += b"%s%d%s" % (runtime.cookie_start, decision.bucket, runtime.cookie_end)
    return own
