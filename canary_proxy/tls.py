"""TLS: the public port's server context and its live certificate reload, and the client
context for ``https://`` upstreams.

The certificate is reloaded into the *same* ``SSLContext`` the listener uses: OpenSSL copies
the context's certificate into each connection when its handshake starts, so new handshakes
get the new certificate and open connections keep the one they were made with. The files are
polled with ``stat`` (following symlinks), which sees every way a Kubernetes Secret mount is
updated, including the kubelet's atomic re-point of the ``..data`` symlink. A new pair is
first loaded into a scratch context: a half-written or mismatched pair never touches the live
one (OpenSSL would otherwise drop the live key when it takes a certificate that does not
match it), so a bad update is logged and the old certificate keeps serving.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import ssl
from collections.abc import Iterator, Sequence

from .certs import Certificates, host_lookup
from .config import ConfigError
from .sources.file import POLL_INTERVAL, changes

log = logging.getLogger(__name__)


class TlsError(Exception):
    """A certificate, key or CA bundle that cannot be loaded; the message says which and why."""


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """The public port's context: TLS 1.2+, HTTP/1.1 only (ALPN). Raises TlsError."""
    ctx = bare_server_context()
    _load_pair(ctx, cert, key)
    return ctx


def bare_server_context() -> ssl.SSLContext:
    """A server context with the public port's settings and no certificate yet."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no client certificates, so no CA store
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # client-initiated renegotiation is a cheap DoS
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def pem_context(cert: bytes, key: bytes, *, origin: str) -> ssl.SSLContext:
    """A server context (as ``server_context``) for a PEM chain and key held in memory, as a
    Secret gives them. Raises TlsError naming ``origin``.

    ``load_cert_chain`` reads only files: the pair goes through anonymous in-memory files
    (memfd), so a private key never touches a disk.
    """
    ctx = bare_server_context()
    with _memory_file(cert) as cert_path, _memory_file(key) as key_path:
        try:
            ctx.load_cert_chain(cert_path, key_path, password=_no_password)
        except (OSError, ValueError, TlsError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise TlsError(f"{origin}: {detail}") from None
    return ctx


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    fd = os.memfd_create("canary-proxy-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _load_pair(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except (OSError, ValueError, TlsError) as exc:  # ssl.SSLError is an OSError
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TlsError(f"cannot load certificate {cert} with key {key}: {detail}") from None


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal, blocking the event loop.
    raise TlsError("the key is encrypted; give an unencrypted key")


def upstream_context(cadata: bytes, *, origin: str) -> ssl.SSLContext:
    """A client context that trusts only the CA certificates in ``cadata`` (PEM or DER)."""
    try:
        text = cadata.decode("ascii")
    except UnicodeDecodeError:
        text = None
    try:
        return ssl.create_default_context(cadata=text if text is not None else cadata)
    except (ssl.SSLError, ValueError) as exc:
        raise TlsError(f"{origin}: no CA certificate could be loaded ({exc})") from None


def read_ca(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TlsError(f"cannot read {path} ({exc.strerror})") from None


def validate_upstream_ca(path: str | None) -> None:
    """The config's ``upstream-ca`` must load, or the config is rejected like any bad value."""
    if path is None:
        return
    try:
        upstream_context(read_ca(path), origin=path)
    except TlsError as exc:
        raise ConfigError(
            [f"upstream-ca: invalid value {path!r}; expected a readable CA bundle: {exc}"]
        ) from None


def _digest(paths: Sequence[str]) -> str | None:
    h = hashlib.sha256()
    try:
        for path in paths:
            with open(path, "rb") as f:
                h.update(f.read())
            h.update(b"\0")
    except OSError:
        return None
    return h.hexdigest()


async def watch_certificate(
    ctx: ssl.SSLContext, cert: str, key: str, *, interval: float = POLL_INTERVAL
) -> None:
    """Reload ``cert``/``key`` into ``ctx`` whenever their content changes; runs until cancelled."""
    paths = (cert, key)
    loaded = _digest(paths)
    rejected: str | None = None
    async for _ in changes(paths, interval=interval):
        digest = _digest(paths)
        if digest is None or digest in (loaded, rejected):
            continue
        try:
            _load_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key)  # scratch: validate first
            _load_pair(ctx, cert, key)
        except TlsError as exc:
            rejected = digest
            log.error("rejected the new TLS certificate, keeping the current one: %s", exc)
            continue
        loaded, rejected = digest, None
        log.info("TLS certificate reloaded from %s", cert, extra={"tls_cert": cert})


class SniContexts:
    """The HTTPS port of Ingress mode: a certificate per host, chosen by SNI, swapped whole.

    The port listens with ``listener``; its ``sni_callback`` runs in each handshake (also
    when the client sends no SNI) and hands the connection the context of its host's pair
    (``certs.host_lookup``: the name, then its wildcard), else the default one. ``apply``
    builds a context per new pair (pairs are shared by digest) and swaps the lookup in one
    assignment: new handshakes get the new certificates, open connections keep theirs.
    """

    def __init__(self, certificates: Certificates) -> None:
        self._contexts: dict[str, ssl.SSLContext] = {}  # by pair digest
        self._state: tuple[dict[str, ssl.SSLContext], ssl.SSLContext | None] = ({}, None)
        self.apply(certificates)
        # Its own certificate is the first default: what a client gets if OpenSSL skipped us.
        first = certificates.pairs[certificates.default]
        self.listener = pem_context(first.cert, first.key, origin="the default certificate")
        self.listener.sni_callback = self._choose

    def apply(self, certificates: Certificates) -> None:
        contexts: dict[str, ssl.SSLContext] = {}
        for digest, pair in certificates.pairs.items():
            ctx = self._contexts.get(digest)
            if ctx is None:
                try:
                    ctx = pem_context(pair.cert, pair.key, origin=f"certificate {digest[:12]}")
                except TlsError as exc:  # validated before it was offered: only a bug gets here
                    log.error("%s; its hosts get the default certificate", exc)
                    continue
            contexts[digest] = ctx
        default = contexts.get(certificates.default, self._state[1])
        if default is None:
            raise TlsError("the default certificate cannot be loaded")
        hosts = {host: contexts.get(digest, default) for host, digest in certificates.hosts.items()}
        self._contexts = contexts
        self._state = (hosts, default)

    def _choose(self, connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        hosts, default = self._state
        chosen = None
        if server_name:
            name, wildcard = host_lookup(server_name)
            chosen = hosts.get(name)
            if chosen is None and wildcard is not None:
                chosen = hosts.get(wildcard)
        chosen = chosen or default
        if chosen is not None:  # None only while the first certificates are being loaded
            connection.context = chosen
