"""What the public port accepts from one client: each field is a ``serve`` flag."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may cost us, and what it may say (nginx's defaults where it has one)."""

    client_header_timeout: float = 10.0  # whole request head within this: stops slowloris
    keepalive_timeout: float = 75.0  # idle keep-alive connections are closed after this
    max_header_size: int = 8 << 10  # request line + headers, bytes; beyond it 431
    max_headers: int = 100  # header fields; beyond it 431
    max_body_size: int = 0  # request body bytes; beyond it 413; 0 = no limit
    max_connections: int = 10_000  # open client connections (TLS handshakes too); beyond it 503
    # Header names with "_" are dropped, as nginx does: CGI-style backends read X_Forwarded_For
    # as X-Forwarded-For (HTTP_X_FORWARDED_FOR), so a client could spoof what the edge set.
    underscores_in_headers: bool = False
    # CIDRs of proxies in front of us (a cloud load balancer) whose X-Forwarded-* are kept.
    trust_forwarded_from: tuple[str, ...] = ()
