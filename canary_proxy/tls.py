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

import hashlib
import logging
import ssl
from collections.abc import Sequence

from .config import ConfigError
from .sources.file import POLL_INTERVAL, changes

log = logging.getLogger(__name__)


class TlsError(Exception):
    """A certificate, key or CA bundle that cannot be loaded; the message says which and why."""


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """The public port's context: TLS 1.2+, HTTP/1.1 only (ALPN). Raises TlsError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no client certificates, so no CA store
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # client-initiated renegotiation is a cheap DoS
    ctx.set_alpn_protocols(["http/1.1"])
    _load_pair(ctx, cert, key)
    return ctx


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
