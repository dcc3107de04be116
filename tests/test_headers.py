"""The pure head rules (``proxy/headers.py``), as tables, without sockets."""

from __future__ import annotations

import pytest

from canary_proxy.proxy.headers import (
    CHUNKED_BODY,
    LENGTH,
    NO_BODY,
    UNTIL_CLOSE,
    Peer,
    client_head,
    invalid_head,
    request_target,
    upstream_head,
)

PEER = Peer.of("10.1.2.3", secure=False, port=b"8080", trusted=False)
TRUSTED = Peer.of("10.0.0.9", secure=True, port=b"8443", trusted=True)


def fields(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return [(n.lower(), v) for n, _, v in (line.partition(": ") for line in lines if line)]


@pytest.mark.parametrize(
    ("version", "method", "url", "lookup", "repeated", "status"),
    [
        ("1.1", "GET", b"/", {b"host": b"shop.example:8080"}, False, 0),
        ("1.1", "GET", b"/", {b"host": b"[::1]:80"}, False, 0),
        ("1.0", "GET", b"/", {}, False, 0),  # 1.0 may omit Host
        ("1.1", "GET", b"/", {}, False, 400),  # 1.1 must not
        ("1.1", "GET", b"/", {b"host": b"a.example/evil?x=1"}, False, 400),
        ("1.1", "GET", b"/", {b"host": b"a b"}, False, 400),
        ("1.1", "GET", b"/", {b"host": b""}, False, 400),
        ("1.1", "GET", b"/", {b"host": b"x"}, True, 400),  # a second Host or Transfer-Encoding
        ("1.0", "POST", b"/", {b"host": b"x", b"transfer-encoding": b"chunked"}, False, 400),
        ("0.9", "GET", b"/", {}, False, 400),
        ("2.0", "GET", b"/", {b"host": b"x"}, False, 505),
        ("1.1", "OPTIONS", b"*", {b"host": b"x"}, False, 0),
        ("1.1", "GET", b"*", {b"host": b"x"}, False, 400),
    ],
)
def test_invalid_head(
    version: str, method: str, url: bytes, lookup: dict[bytes, bytes], repeated: bool, status: int
) -> None:
    assert invalid_head(version=version, method=method, url=url, lookup=lookup, repeated=repeated) == status


@pytest.mark.parametrize(
    ("url", "target"),
    [(b"/a?b", b"/a?b"), (b"*", b"*"), (b"http://evil/x?y", b"/x?y"), (b"http://evil", b"/")],
)
def test_request_target(url: bytes, target: bytes) -> None:
    assert request_target(url) == target


def head_for(peer: Peer, headers: list[tuple[bytes, bytes]], *, framing: bytes | None = b"") -> bytes:
    return upstream_head(
        method="POST",
        url=b"/p",
        headers=headers,
        host=b"shop",
        default_host=b"stable:80",
        peer=peer,
        request_id="rid",
        framing=framing,
    )


CLIENT_SAYS = [
    (b"X-Forwarded-For", b"1.1.1.1"),
    (b"X-Real-IP", b"2.2.2.2"),
    (b"X-Forwarded-Proto", b"https"),
    (b"X-Forwarded-Port", b"1"),
    (b"X-Forwarded-Host", b"evil"),
    (b"Forwarded", b"for=3.3.3.3"),
    (b"Connection", b"close, X-Secret"),
    (b"X-Secret", b"s"),
    (b"X-App", b"kept"),
]


def test_an_untrusted_client_cannot_say_who_it_is() -> None:
    head = head_for(PEER, CLIENT_SAYS)
    assert head.startswith(b"POST /p HTTP/1.1\r\nHost: shop\r\n")
    assert fields(head) == [
        ("host", "shop"),
        ("x-app", "kept"),
        ("x-forwarded-for", "10.1.2.3"),
        ("x-real-ip", "10.1.2.3"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-port", "8080"),
        ("x-forwarded-host", "shop"),
        ("x-request-id", "rid"),
    ]


def test_a_trusted_proxy_keeps_its_forwarding_fields_and_we_append() -> None:
    found = dict(fields(head_for(TRUSTED, CLIENT_SAYS)))
    assert found["x-forwarded-for"] == "1.1.1.1, 10.0.0.9"
    assert found["x-real-ip"] == "2.2.2.2"
    assert found["x-forwarded-proto"] == "https"
    assert found["x-forwarded-port"] == "1"
    assert found["x-forwarded-host"] == "evil"
    assert found["forwarded"] == "for=3.3.3.3"
    assert "x-secret" not in found


def test_a_trusted_proxy_that_says_nothing_gets_what_we_saw() -> None:
    found = dict(fields(head_for(TRUSTED, [(b"X-Forwarded-For", b"1.1.1.1, 4.4.4.4")])))
    assert found["x-forwarded-for"] == "1.1.1.1, 4.4.4.4, 10.0.0.9"
    assert found["x-real-ip"] == "1.1.1.1"  # the leftmost: the client the first proxy saw
    assert (found["x-forwarded-proto"], found["x-forwarded-port"]) == ("https", "8443")
    assert found["x-forwarded-host"] == "shop"


def test_an_open_head_has_no_framing_and_no_end() -> None:
    head = head_for(PEER, [], framing=None)
    assert head.endswith(b"X-Request-Id: rid\r\n")
    assert head_for(PEER, [], framing=b"Content-Length: 3\r\n").endswith(b"Content-Length: 3\r\n\r\n")


@pytest.mark.parametrize(
    ("status", "headers", "head_request", "http11", "framing", "close"),
    [
        (200, [(b"Content-Length", b"5")], False, True, LENGTH, False),
        (200, [], False, True, CHUNKED_BODY, False),
        (200, [], False, False, UNTIL_CLOSE, True),  # HTTP/1.0 client, no length: the close ends it
        (200, [(b"Content-Length", b"5")], True, True, NO_BODY, False),  # HEAD
        (204, [], False, True, NO_BODY, False),
        (304, [(b"Content-Length", b"5")], False, True, NO_BODY, False),
        (101, [(b"Upgrade", b"websocket")], False, True, NO_BODY, False),
    ],
)
def test_client_head_framing(
    status: int,
    headers: list[tuple[bytes, bytes]],
    head_request: bool,
    http11: bool,
    framing: bytes,
    close: bool,
) -> None:
    head, chosen, closes = client_head(
        status=status, reason=b"R", headers=headers, head_request=head_request, http11=http11,
        close=False, own=b"X-Own: 1\r\n",
    )  # fmt: skip
    assert (chosen, closes) == (framing, close)
    end = b"Connection: close\r\n\r\n" if close else b"X-Own: 1\r\n\r\n"
    assert head.startswith(b"HTTP/1.1 %d R\r\n" % status) and head.endswith(end)


def test_client_head_drops_hop_by_hop_and_what_connection_names() -> None:
    head, _, _ = client_head(
        status=200, reason=b"OK",
        headers=[(b"Connection", b"X-Internal"), (b"X-Internal", b"1"), (b"Keep-Alive", b"t=1"),
                 (b"Transfer-Encoding", b"chunked"), (b"X-App", b"yes")],
        head_request=False, http11=True, close=True, own=b"",
    )  # fmt: skip
    assert fields(head) == [("x-app", "yes"), ("transfer-encoding", "chunked"), ("connection", "close")]
