"""Ingress mode's HTTPS port (--tls-listen): its certificate store, its SNI contexts, and
how the store reaches the data plane (in this process, or over the wire to each worker)."""

from __future__ import annotations

import logging

from ..certs import Certificates, Pair, parse_secret_ref
from ..metrics import Metrics
from ..proxy.server import ProxyServer
from ..selfsigned import fake_certificate
from ..sources.ingress import IngressSource
from ..sources.secrets import follow_secrets
from ..tls import SniContexts
from ..tls_store import TlsStore
from .public import Public, serve_https
from .settings import Settings

log = logging.getLogger(__name__)


def tls_store(settings: Settings, metrics: Metrics | None) -> TlsStore:
    """The store, with a fresh self-signed placeholder as the default certificate until
    (and unless) --default-tls-secret gives a good one."""
    default = parse_secret_ref(settings.default_tls_secret) if settings.default_tls_secret else None
    return TlsStore(fallback=Pair(*fake_certificate()), default_secret=default, metrics=metrics)


def follow_certificates(store: TlsStore, source: IngressSource, *, namespace: str | None) -> None:
    """Feed ``store`` from Ingress mode's source: its claimed Ingresses, and a watch of the
    TLS Secrets in its namespace (or all) on its client; plus one of the default Secret by
    name, when it lives outside that namespace."""
    source.on_claimed_ingresses.append(store.ingresses)
    source.tasks.append(lambda client: follow_secrets(store, client, namespace=namespace))
    default = store.default_secret
    if default is not None and namespace not in (None, default[0]):
        source.tasks.append(
            lambda client: follow_secrets(store, client, namespace=default[0], name=default[1])
        )


async def open_https(
    proxy: ProxyServer, settings: Settings, certificates: Certificates, *, reuse_port: bool = False
) -> tuple[Public, SniContexts]:
    """Listen on --tls-listen with ``certificates``; ``SniContexts.apply`` takes the next ones."""
    assert settings.tls_listen is not None
    sni = SniContexts(certificates)
    public = await serve_https(proxy, settings.tls_listen, sni.listener, reuse_port=reuse_port)
    return public, sni
