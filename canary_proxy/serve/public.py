"""The public port: its socket, its TLS, and the drain that closes it (single process and workers)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..address import Address, ListenError, bound_address
from ..proxy.accesslog import AccessLog
from ..proxy.server import ProxyServer
from ..tls import server_context, watch_certificate
from .lifecycle import Lifecycle
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Public:
    server: asyncio.Server
    address: Address
    tls: ssl.SSLContext | None = None
    protocol: Callable[[], asyncio.Protocol] | None = None  # None: the proxy's own


def public_socket(address: Address, *, reuse_port: bool, flag: str = "--listen") -> socket.socket:
    """The bound public socket (not listening yet). ListenError (naming ``flag``) if it
    cannot be bound."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address.host, address.port))
    except OSError as exc:
        sock.close()
        raise ListenError(flag, address, exc) from None
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
    bound = bound_address(server)
    log.info("proxy listening on %s%s", bound, " (TLS)" if tls else "", extra={"public": str(bound)})
    return Public(server, bound, tls)


async def serve_https(
    proxy: ProxyServer, address: Address, tls: ssl.SSLContext, *, reuse_port: bool = False
) -> Public:
    """Ingress mode's HTTPS port (--tls-listen), beside the plain public port: the same
    proxy, over TLS with ``tls`` (``SniContexts.listener``: a certificate per host)."""
    sock = public_socket(address, reuse_port=reuse_port, flag="--tls-listen")
    server = await asyncio.get_running_loop().create_server(
        proxy.tls_protocol, sock=sock, backlog=1024, ssl=tls, ssl_handshake_timeout=proxy.handshake_timeout()
    )
    bound = bound_address(server)
    log.info("proxy listening on %s (TLS)", bound, extra={"https": str(bound)})
    return Public(server, bound, tls, proxy.tls_protocol)


def _tls_options(proxy: ProxyServer, tls: ssl.SSLContext | None) -> dict[str, Any]:
    if tls is None:
        return {}
    return {"ssl": tls, "ssl_handshake_timeout": proxy.handshake_timeout()}


def public_tls(settings: Settings) -> ssl.SSLContext | None:
    """The public port's TLS context, or None for plain HTTP. Raises TlsError."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    return server_context(settings.tls_cert, settings.tls_key)


def watch_tls(life: Lifecycle, settings: Settings, tls: ssl.SSLContext | None) -> None:
    """Reload the certificate pair in place when its files change, for the process's life."""
    if tls is not None and settings.tls_cert is not None and settings.tls_key is not None:
        life.start(watch_certificate(tls, settings.tls_cert, settings.tls_key))


def access_log_for(settings: Settings) -> AccessLog | None:
    return AccessLog() if settings.access_log else None


async def drain(
    public: Public | Sequence[Public], proxy: ProxyServer, settings: Settings, life: Lifecycle
) -> None:
    """The pod-termination sequence after /readyz has turned 503 (done by the caller).

    Keep serving for ``drain_delay`` so endpoint controllers take us out of rotation (telling
    keep-alive clients to reconnect elsewhere), stop accepting, let in-flight HTTP requests
    finish for up to ``shutdown_timeout``, close WebSockets with 1001, and close the rest.
    A second Ctrl-C (``life.hurry``) cuts the waiting short.
    """
    proxy.closing = True
    log.info("draining: serving for %.1fs before closing the listener", settings.drain_delay)
    await life.unless_hurried(asyncio.sleep(settings.drain_delay))
    # Closing a listener resets the connections the kernel queued that we have not accepted
    # yet, though their clients may have sent a request already: accept them first.
    loop = asyncio.get_running_loop()
    accepting = []
    for listener in [public] if isinstance(public, Public) else public:
        queued = _accept_queued(listener.server)
        listener.server.close()
        options = _tls_options(proxy, listener.tls)
        factory = listener.protocol or proxy.protocol
        accepting += [loop.connect_accepted_socket(factory, conn, **options) for conn in queued]
    # All at once: a TLS handshake that stalls must not hold up the others.
    await life.unless_hurried(asyncio.gather(*accepting, return_exceptions=True))
    deadline = loop.time() + settings.shutdown_timeout
    await life.unless_hurried(proxy.wait_http_idle(deadline))
    await proxy.close_websockets()
    grace = 0.0 if life.hurry.is_set() else deadline - loop.time()
    await proxy.close(timeout=min(max(0.1, grace), 2.0))
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
