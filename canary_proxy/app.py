"""Wiring: build the servers from settings, follow the config source, and own the lifecycle.

One process (``--workers 1``) runs everything here. With more workers, ``supervisor`` runs
the control plane (config source, admin port) and each ``worker`` runs the data plane with
the same ``serve_public`` / ``drain`` code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .config import Config, ConfigError, parse_config
from .metrics import Metrics
from .proxy.accesslog import AccessLog
from .proxy.limits import Limits
from .proxy.server import ProxyServer
from .router import DEFAULT_ROUTE
from .sources.file import RawConfig
from .stats import RolloutNotes, Sampler, stats_document
from .tls import TlsError, server_context, validate_upstream_ca, watch_certificate

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """``host:port``, ``[v6]:port`` or ``:port`` (all interfaces)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    return Address(host, int(port))


@dataclass(frozen=True, slots=True)
class Settings:
    """Process settings from the CLI (the config itself comes from the source)."""

    listen: Address = Address("0.0.0.0", 8080)
    admin_listen: Address = Address("0.0.0.0", 9090)
    workers: int = 1
    drain_delay: float = 5.0
    shutdown_timeout: float = 30.0
    access_log: bool = True
    config_path: str | None = None
    log_format: str = "json"
    log_level: str = "info"
    limits: Limits = field(default_factory=Limits)
    tls_cert: str | None = None  # with tls_key: the public port speaks TLS; reloaded on change
    tls_key: str | None = None


class ConfigControl:
    """Validates each raw config the source offers; swaps in good ones, counts bad ones once.

    An invalid update never replaces the last good config: it is logged with the reason and
    counted as one ``failure`` per distinct content, however often it is re-read. An offer
    with the digest of the one before -- a ConfigMap whose rollout annotations alone changed
    -- only updates ``rollout_notes``: it is no reload, and is neither logged nor counted.
    """

    def __init__(self, metrics: Metrics, on_change: list[Callable[[Config, dict[str, Any]], None]]) -> None:
        self.metrics = metrics
        self.on_change = on_change
        self.current: Config | None = None
        self.current_raw: dict[str, Any] | None = None
        self.rollout_notes: RolloutNotes | None = None  # ConfigMap mode: for the dashboard
        self._last: tuple[str, bool] | None = None  # the last offer's digest, and if it was taken

    def offer(self, raw: RawConfig, *, origin: str) -> bool:
        if raw.annotations is not None:
            # A ConfigMap source's origin is "configmap NS/NAME", as its rollout store names it.
            self.rollout_notes = RolloutNotes(origin, raw.annotations)
        if self._last is not None and self._last[0] == raw.digest:
            return self._last[1]
        accepted = self._load(raw, origin=origin)
        self._last = (raw.digest, accepted)
        return accepted

    def _load(self, raw: RawConfig, *, origin: str) -> bool:
        try:
            if raw.error is not None:
                raise raw.error
            assert raw.data is not None
            config = parse_config(raw.data)
            validate_upstream_ca(config.upstream_ca)  # the one key that names a file
        except ConfigError as exc:
            self.metrics.config_reloads.labels("failure").inc()
            log.error(
                "rejected new config from %s, keeping the last good one: %s",
                origin,
                "; ".join(exc.errors),
                extra={"errors": exc.errors},
            )
            return False
        changed = config != self.current
        self.current = config
        self.current_raw = dict(raw.data)
        self.metrics.config_reloads.labels("success").inc()
        self.metrics.config_last_success.set(time.time())
        self.metrics.weight_ratio.labels(DEFAULT_ROUTE).set(config.weight_ratio)
        if changed:
            for callback in self.on_change:
                callback(config, self.current_raw)
        effective = config.effective()
        log.info(
            "config loaded from %s: canary-weight %s/%s",
            origin,
            effective["canary-weight"],
            config.canary_weight_total,
            extra={"effective": effective},
        )
        return True

    async def follow(self, updates: AsyncIterator[RawConfig], *, origin: str) -> None:
        async for raw in updates:
            self.offer(raw, origin=origin)


# -- admin port ------------------------------------------------------------------------------


@dataclass(slots=True)
class AdminState:
    control: ConfigControl
    registry: CollectorRegistry
    ready: Callable[[], bool]
    config_path: str | None = None  # file mode: the dashboard shows the rollout beside it
    # (in ConfigMap mode the rollout comes with the config: ``control.rollout_notes``)


ADMIN_STATE = web.AppKey("admin_state", AdminState)
STATS = web.AppKey("stats", Sampler)
DASHBOARD_DIR = Path(__file__).with_name("dashboard")  # package data: the page, its script, uPlot


def admin_app(state: AdminState) -> web.Application:
    app = web.Application()
    app[ADMIN_STATE] = state
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/config", _config)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/stats", _stats)
    app.router.add_get("/", _dashboard)
    app.router.add_static("/dashboard/", DASHBOARD_DIR)
    app[STATS] = Sampler(state.registry, config_path=state.config_path)
    app.cleanup_ctx.append(_sampling)
    return app


async def _sampling(app: web.Application) -> AsyncIterator[None]:
    """Snapshot the collectors once a second for /stats while the admin port is up."""
    control = app[ADMIN_STATE].control
    task = asyncio.create_task(app[STATS].run(lambda: control.current_raw, lambda: control.rollout_notes))
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _dashboard(request: web.Request) -> web.FileResponse:
    return web.FileResponse(DASHBOARD_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _stats(request: web.Request) -> web.Response:
    """Chart data from the sampler's ring buffer (the same collectors as /metrics)."""
    sampler, config = request.app[STATS], request.app[ADMIN_STATE].control.current
    document = stats_document(
        list(sampler.ring),
        effective=None if config is None else config.effective(),
        rollout=sampler.rollout,
        interval=sampler.interval,
    )
    return web.json_response(document, headers={"Cache-Control": "no-store"})


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    if request.app[ADMIN_STATE].ready():
        return web.Response(text="ready\n")
    return web.Response(status=503, text="not ready\n")


async def _config(request: web.Request) -> web.Response:
    config = request.app[ADMIN_STATE].control.current
    if config is None:
        return web.json_response({"error": "no config loaded yet"}, status=503)
    return web.json_response(config.effective())


async def _metrics(request: web.Request) -> web.Response:
    registry = request.app[ADMIN_STATE].registry
    body = await asyncio.to_thread(generate_latest, registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def start_admin(state: AdminState, address: Address) -> tuple[web.AppRunner, Address]:
    runner = web.AppRunner(admin_app(state), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, address.host, address.port)
    await site.start()
    bound = _bound(site._server)
    log.info("admin port listening on %s", bound, extra={"admin": str(bound)})
    return runner, bound


def _bound(server: Any) -> Address:
    sockname = server.sockets[0].getsockname()
    return Address(sockname[0], sockname[1])


# -- public port ---------------------------------------------------------------------------


@dataclass(slots=True)
class Public:
    server: asyncio.Server
    address: Address
    tls: ssl.SSLContext | None = None


def public_socket(address: Address, *, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((address.host, address.port))
    sock.setblocking(False)
    return sock


async def serve_public(
    proxy: ProxyServer,
    address: Address,
    *,
    reuse_port: bool = False,
    tls: ssl.SSLContext | None = None,
) -> Public:
    sock = public_socket(address, reuse_port=reuse_port)
    proxy.tls = tls  # handshakes in progress count as connections: see ProxyServer.protocol
    server = await asyncio.get_running_loop().create_server(
        proxy.protocol, sock=sock, backlog=1024, **_tls_options(proxy, tls)
    )
    bound = _bound(server)
    log.info("proxy listening on %s%s", bound, " (TLS)" if tls else "", extra={"public": str(bound)})
    return Public(server, bound, tls)


def _tls_options(proxy: ProxyServer, tls: ssl.SSLContext | None) -> dict[str, Any]:
    if tls is None:
        return {}
    return {"ssl": tls, "ssl_handshake_timeout": proxy.handshake_timeout()}


def public_tls(settings: Settings) -> ssl.SSLContext | None:
    """The public port's TLS context, or None for plain HTTP. Raises TlsError."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    return server_context(settings.tls_cert, settings.tls_key)


def watch_tls(settings: Settings, tls: ssl.SSLContext | None) -> asyncio.Task[None] | None:
    if tls is None or settings.tls_cert is None or settings.tls_key is None:
        return None
    return asyncio.create_task(watch_certificate(tls, settings.tls_cert, settings.tls_key))


async def drain(public: Public, proxy: ProxyServer, *, drain_delay: float, shutdown_timeout: float) -> None:
    """The pod-termination sequence after /readyz has turned 503 (done by the caller).

    Keep serving for ``drain_delay`` so endpoint controllers take us out of rotation (telling
    keep-alive clients to reconnect elsewhere), stop accepting, let in-flight HTTP requests
    finish for up to ``shutdown_timeout``, close WebSockets with 1001, and close the rest.
    """
    proxy.closing = True
    log.info("draining: serving for %.1fs before closing the listener", drain_delay)
    await asyncio.sleep(drain_delay)
    # Closing a listener resets the connections the kernel queued that we have not accepted
    # yet, though their clients may have sent a request already: accept them first.
    queued = _accept_queued(public.server)
    public.server.close()
    loop = asyncio.get_running_loop()
    options = _tls_options(proxy, public.tls)
    await asyncio.gather(  # at once: a TLS handshake that stalls must not hold up the others
        *(loop.connect_accepted_socket(proxy.protocol, conn, **options) for conn in queued),
        return_exceptions=True,
    )
    deadline = loop.time() + shutdown_timeout
    await proxy.wait_http_idle(deadline)
    await proxy.close_websockets()
    await proxy.close(timeout=min(max(0.1, deadline - loop.time()), 2.0))
    log.info("drained; exiting")


def _accept_queued(server: asyncio.Server) -> list[socket.socket]:
    """Accept, without blocking, every connection already waiting in the listeners' queues."""
    queued: list[socket.socket] = []
    for listener in server.sockets:
        dup = socket.socket(fileno=os.dup(listener.fileno()))  # uvloop's sockets cannot accept()
        try:
            while True:
                try:
                    conn, _ = dup.accept()
                except OSError:  # BlockingIOError: the queue is empty
                    break
                conn.setblocking(False)
                queued.append(conn)
        finally:
            dup.close()
    return queued


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def access_log_for(settings: Settings) -> AccessLog | None:
    return AccessLog() if settings.access_log else None


async def run_single(
    settings: Settings,
    *,
    initial: RawConfig | None,
    updates: Callable[[], AsyncIterator[RawConfig]],
    origin: str,
) -> int:
    """``--workers 1``: control plane and data plane in this one process.

    ``initial`` is None when the source has nothing yet (a ConfigMap behind an API that is
    down): the ports open at once, /readyz says 503 and requests get 503 until it loads.
    """
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.init_data_plane()
    metrics.init_control_plane()
    proxy = ProxyServer(metrics=metrics, access_log=access_log_for(settings), limits=settings.limits)
    control = ConfigControl(metrics, [lambda config, _raw: proxy.apply(config)])
    if initial is not None and not control.offer(initial, origin=origin):
        return 2
    try:
        tls = public_tls(settings)
    except TlsError as exc:
        log.error("%s", exc)
        return 2
    stop = asyncio.Event()
    install_stop_signals(stop)
    stopping = False
    public = await serve_public(proxy, settings.listen, tls=tls)
    admin, admin_address = await start_admin(
        AdminState(
            control,
            registry,
            lambda: not stopping and control.current is not None,
            config_path=settings.config_path,
        ),
        settings.admin_listen,
    )
    ports = {"public": str(public.address), "admin": str(admin_address)}
    if control.current is not None:
        log.info("ready", extra=ports)
    else:
        log.warning("waiting for a valid config from %s; /readyz is 503 until then", origin)
        control.on_change.append(_once(lambda: log.info("ready", extra=ports)))
    follower = asyncio.create_task(control.follow(updates(), origin=origin))
    background = [t for t in (follower, watch_tls(settings, tls)) if t is not None]
    try:
        await stop.wait()
        stopping = True
        log.info("SIGTERM: /readyz is now 503")
        await drain(
            public,
            proxy,
            drain_delay=settings.drain_delay,
            shutdown_timeout=settings.shutdown_timeout,
        )
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await admin.cleanup()
    return 0


def _once(action: Callable[[], None]) -> Callable[[Config, dict[str, Any]], None]:
    done = False

    def callback(_config: Config, _raw: dict[str, Any]) -> None:
        nonlocal done
        if not done:
            done = True
            action()

    return callback


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
