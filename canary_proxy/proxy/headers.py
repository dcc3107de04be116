"""Pure HTTP/1.1 head rules: what a request head must be, and the heads the proxy writes.

No I/O here: the hop-by-hop and forwarding rules, request validity (RFC 9112), and the two
head builders (the request head sent upstream, the response head sent to the client) are
plain functions of their inputs, unit-tested without sockets.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

Headers = list[tuple[bytes, bytes]]

# RFC 9110 7.6.1 hop-by-hop fields, plus the legacy Proxy-Connection and Keep-Alive.
HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
     b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)  # fmt: skip
# What the edge says about the client: replaced by what the proxy saw, unless the peer is a
# trusted proxy (``--trust-forwarded-from``), whose values are kept and appended to.
FORWARDING: Final = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"x-real-ip",
     b"forwarded"}
)  # fmt: skip
# Set from what the proxy saw, or handled by the proxy itself.
_REPLACED: Final = FORWARDING | {b"x-request-id", b"expect", b"content-length", b"host"}
_UPSTREAM_DROP: Final = HOP_BY_HOP | _REPLACED
# Fields a request may carry once at most (RFC 9112 3.2, 6.1); a second one is a 400.
SINGLE: Final = frozenset({b"host", b"transfer-encoding"})
# RFC 3986 host [":" port]: an IP literal, or reg-name characters (no "/", "?", "@", space...).
_VALID_HOST: Final = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::[0-9]{0,5})?")
# Hosts already found valid: a client sends the same Host on every request, and the set of
# names a proxy serves is small; the regex costs more than the rest of the check.
_good_hosts: dict[bytes, bool] = {}
_GOOD_HOSTS_KEPT = 1024
_MAX_REQUEST_ID = 200
STATUS_TEXT: Final = {400: b"Bad Request", 405: b"Method Not Allowed", 413: b"Content Too Large",
                      417: b"Expectation Failed",
                      431: b"Request Header Fields Too Large", 499: b"Client Closed Request",
                      500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
                      503: b"Service Unavailable", 504: b"Gateway Timeout",
                      505: b"HTTP Version Not Supported"}  # fmt: skip
WS_CLOSE_GOING_AWAY_TO_CLIENT: Final = b"\x88\x02\x03\xe9"  # unmasked close frame, code 1001

# Response body framings the client head chose (``client_head``).
NO_BODY: Final = b""
LENGTH: Final = b"length"
CHUNKED_BODY: Final = b"chunked"
UNTIL_CLOSE: Final = b"close"

_ids = random.Random(os.urandom(16))


def new_request_id() -> str:
    # Unique, not secret: a seeded PRNG avoids a getrandom(2) syscall per request.
    return f"{_ids.getrandbits(128):032x}"


def valid_request_id(value: bytes) -> bool:
    # Printable ASCII only: a client-chosen id must not inject into logs or headers.
    return 0 < len(value) <= _MAX_REQUEST_ID and all(32 < b < 127 for b in value)


def connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def _forward(headers: Headers, always: frozenset[bytes], parts: list[bytes]) -> bytes | None:
    """Append to ``parts`` the fields of ``headers`` to forward: not in ``always`` (which holds
    Connection), nor named by a Connection field; return the last Content-Length value, which
    is never appended. One pass: only a Connection field that names a field outside
    ``always`` costs a second one (most say keep-alive, one token in ``always``)."""
    start = len(parts)
    length = None
    connection = False
    for name, value in headers:
        low = name.lower()
        if low in always:
            connection = connection or (low == b"connection" and value.lower() not in always)
        elif low == b"content-length":
            length = value
        else:
            parts += [name, b": ", value, b"\r\n"]
    if connection:
        named = connection_tokens(headers) - always
        if named:
            del parts[start:]
            for name, value in headers:
                low = name.lower()
                if low not in always and low not in named and low != b"content-length":
                    parts += [name, b": ", value, b"\r\n"]
    return length


def header(headers: Headers, name: bytes) -> bytes:
    for key, value in headers:
        if key.lower() == name:
            return value
    return b""


def request_target(url: bytes) -> bytes:
    """Path and query byte for byte. An absolute-form target is routed by its path only, so
    its host is never contacted: this proxy forwards to the configured upstreams, nowhere else.
    """
    if url.startswith(b"/") or url == b"*":  # "*": OPTIONS for the server as a whole
        return url
    scheme_end = url.find(b"://")
    if scheme_end < 0:
        return b"/" + url
    slash = url.find(b"/", scheme_end + 3)
    query = url.find(b"?", scheme_end + 3)
    if slash < 0 or 0 <= query < slash:
        return b"/" + (url[query:] if query >= 0 else b"")
    return url[slash:]


def invalid_head(version: str, method: str, url: bytes, lookup: Mapping[bytes, bytes], repeated: bool) -> int:
    """The status for a request head that is no valid HTTP/1.x request, or 0 (RFC 9112).
    ``lookup`` maps lower-case names to values; ``repeated``: a field of SINGLE came twice.
    Positional, like the head builders below: they run once per request, and a call by
    keyword costs more than the rest of such a check."""
    if version != "1.1" and version != "1.0":
        return 400 if version == "0.9" else 505  # llhttp knows 0.9 (no version at all) and 2.0
    if repeated:  # two Host or Transfer-Encoding fields: which one would a peer use?
        return 400
    host = lookup.get(b"host")
    if host is None:
        if version == "1.1":
            return 400
    elif host not in _good_hosts:
        if not _VALID_HOST.fullmatch(host):
            return 400
        if len(_good_hosts) >= _GOOD_HOSTS_KEPT:
            _good_hosts.clear()
        _good_hosts[host] = True
    if version == "1.0" and b"transfer-encoding" in lookup:  # 1.0 has no chunked coding
        return 400
    if url == b"*" and method != "OPTIONS":
        return 400
    return 0


def is_websocket(headers: Headers, lookup: Mapping[bytes, bytes]) -> bool:
    upgrade = lookup.get(b"upgrade", b"").strip().lower()
    return upgrade == b"websocket" and b"upgrade" in connection_tokens(headers)


def cookie_value(cookie_header: bytes | None, name: str) -> str | None:
    """One cookie's value from a Cookie header, without parsing the others."""
    if not cookie_header or not name:
        return None
    wanted = name.encode()
    for part in cookie_header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == wanted:
            return value.strip(b'"').decode("latin-1")
    return None


def simple_response(
    status: int, body: bytes, *, extra: bytes = b"", close: bool = False, head: bool = False
) -> bytes:
    """A response of the proxy's own; ``head``: to a HEAD request, so without its body (a
    client reads none, and would take the body for the next response)."""
    start = b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % (
        status,
        STATUS_TEXT.get(status, b"Error"),
        len(body),
    )
    return start + extra + (b"Connection: close\r\n" if close else b"") + b"\r\n" + (b"" if head else body)


@dataclass(frozen=True, slots=True)
class Peer:
    """What the proxy saw of a client connection, the same for every request on it."""

    client: str  # the peer's address
    secure: bool  # it came over TLS
    port: bytes  # our own port, for X-Forwarded-Port
    trusted: bool = False  # in --trust-forwarded-from: its X-Forwarded-* are kept
    edge: bytes = b""  # X-Forwarded-For/-Proto/-Port and X-Real-IP, built once (untrusted only)

    @classmethod
    def of(cls, client: str, *, secure: bool, port: bytes, trusted: bool) -> Peer:
        address = client.encode()
        proto = b"https" if secure else b"http"
        edge = b"" if trusted else b"".join(
            b"%s: %s\r\n" % field
            for field in ((b"X-Forwarded-For", address), (b"X-Real-IP", address),
                          (b"X-Forwarded-Proto", proto), (b"X-Forwarded-Port", port))
        )  # fmt: skip
        return cls(client, secure, port, trusted, edge)


def forwarding(headers: Headers, peer: Peer, host: bytes | None) -> bytes:
    """The X-Forwarded-* and X-Real-IP fields for a request from a trusted proxy: its values
    are kept (it saw the real client), the peer is appended to X-Forwarded-For, and what it
    did not say is filled in from what we saw."""
    given: dict[bytes, bytes] = {}
    chain: list[bytes] = []
    for name, value in headers:
        low = name.lower()
        if low == b"x-forwarded-for":
            chain.append(value)
        elif low in FORWARDING:
            given[low] = value
    address = peer.client.encode()
    first = chain[0].split(b",")[0].strip() if chain else b""
    fields = [
        (b"X-Forwarded-For", b", ".join([*chain, address])),
        (b"X-Real-IP", given.get(b"x-real-ip") or first or address),
        (b"X-Forwarded-Proto", given.get(b"x-forwarded-proto") or (b"https" if peer.secure else b"http")),
        (b"X-Forwarded-Port", given.get(b"x-forwarded-port") or peer.port),
        (b"X-Forwarded-Host", given.get(b"x-forwarded-host") or host or b""),
        (b"Forwarded", given.get(b"forwarded", b"")),
    ]
    return b"".join(b"%s: %s\r\n" % (name, value) for name, value in fields if value)


def upstream_head(
    method: str,
    url: bytes,
    headers: Headers,
    host: bytes | None,
    default_host: bytes,
    peer: Peer,
    request_id: str,
    framing: bytes | None,
    upgrade: bytes | None = None,
) -> bytes:
    """The request head sent upstream: hop-by-hop and client-set edge fields dropped, ours
    added. ``upgrade``: the Upgrade value of a WebSocket handshake (relayed as one).
    ``framing``: the Content-Length or Transfer-Encoding line; None leaves the head open
    (no framing, no blank line: a mirror copy adds its own)."""
    parts = [method.encode(), b" ", request_target(url), b" HTTP/1.1\r\n"]
    parts += [b"Host: ", host if host is not None else default_host, b"\r\n"]
    _forward(headers, _UPSTREAM_DROP, parts)  # Content-Length is in _UPSTREAM_DROP
    if peer.trusted:
        parts.append(forwarding(headers, peer, host))
    else:
        parts.append(peer.edge)
        if host is not None:
            parts += [b"X-Forwarded-Host: ", host, b"\r\n"]
    parts += [b"X-Request-Id: ", request_id.encode(), b"\r\n"]
    if upgrade is not None:
        parts += [b"Connection: Upgrade\r\nUpgrade: ", upgrade, b"\r\n"]
    if framing is None:
        return b"".join(parts)
    parts += [framing, b"\r\n"]
    return b"".join(parts)


def request_framing(chunked: bool, content_length: int | None) -> bytes:
    if chunked:
        return b"Transfer-Encoding: chunked\r\n"
    if content_length is not None:
        return b"Content-Length: %d\r\n" % content_length
    return b""


def client_head(
    status: int,
    reason: bytes,
    headers: Headers,
    head_request: bool,
    http11: bool,
    close: bool,
    own: bytes,
) -> tuple[bytes, bytes, bool]:
    """The response head for the client, the body framing it chose (NO_BODY, LENGTH,
    CHUNKED_BODY or UNTIL_CLOSE) and whether the client connection closes after it.
    ``close``: it must close anyway (draining, the client asked, an unfinished request body);
    ``own``: the proxy's own fields (version header, request id, sticky cookie)."""
    parts = [b"HTTP/1.1 %d " % status, reason, b"\r\n"]
    length = _forward(headers, HOP_BY_HOP, parts)
    framing = NO_BODY
    if status == 101:
        parts += [b"Connection: Upgrade\r\nUpgrade: ", header(headers, b"upgrade"), b"\r\n"]
    elif head_request or status in (204, 304) or status < 200:
        if length is not None and status != 204:
            parts += [b"Content-Length: ", length, b"\r\n"]
    elif length is not None:
        framing = LENGTH
        parts += [b"Content-Length: ", length, b"\r\n"]
    elif http11:
        framing = CHUNKED_BODY
        parts.append(b"Transfer-Encoding: chunked\r\n")
    else:
        framing = UNTIL_CLOSE
        close = True
    parts.append(own)
    if status != 101 and close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts), framing, close and status != 101
