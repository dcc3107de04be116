"""The reuse rule (``upstream.reuse_refusal``), case by case, with no sockets: a connection
goes back to the pool only when both directions were framed exactly and nothing upgraded."""

from __future__ import annotations

import pytest

from canary_proxy.config import parse_upstream
from canary_proxy.proxy.upstream import CHUNKED, UpstreamConnection, UpstreamPool, reuse_refusal


class _Sink:
    def on_response_head(self, conn: UpstreamConnection) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_complete(self) -> None: ...
    def on_upstream_upgraded(self, rest: bytes) -> None: ...
    def on_upstream_raw(self, data: bytes) -> None: ...
    def on_upstream_error(self, reason: str, detail: str) -> None: ...
    def on_upstream_writable(self, writable: bool) -> None: ...


def connection(*, framing: int = 0, upgrade: bool = False) -> UpstreamConnection:
    conn = UpstreamConnection(UpstreamPool(parse_upstream("http://127.0.0.1:1")))
    conn.start(_Sink(), framing=framing, upgrade=upgrade)
    return conn


def answered(conn: UpstreamConnection, *, keep_alive: bool = True) -> UpstreamConnection:
    conn.status, conn.keep_alive, conn.response_done = 200, keep_alive, True
    return conn


def test_a_whole_exchange_is_reusable() -> None:
    assert reuse_refusal(answered(connection())) is None


def test_a_length_body_must_be_written_in_full() -> None:
    conn = connection(framing=10)
    conn.write_body(b"12345")
    assert reuse_refusal(answered(conn)) == "request body not sent exactly as framed"
    conn.write_body(b"67890")
    assert reuse_refusal(conn) is None


def test_more_body_than_announced_is_never_written_and_refuses_reuse() -> None:
    conn = connection(framing=3)
    conn.write_body(b"abcd")
    assert conn.request_left == 3 and conn.overrun
    assert reuse_refusal(answered(conn)) == "request body not sent exactly as framed"


def test_a_chunked_body_must_reach_its_last_chunk() -> None:
    conn = connection(framing=CHUNKED)
    conn.write_body(b"abc")
    assert reuse_refusal(answered(conn)) == "request body not sent exactly as framed"
    conn.end_body()
    assert reuse_refusal(conn) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda c: setattr(c, "response_done", False), "response not read to its end"),
        (lambda c: setattr(c, "keep_alive", False), "upstream asked to close"),
        (lambda c: setattr(c, "upgraded", True), "upgrade"),
        (lambda c: setattr(c, "closed", True), "closed"),
    ],
)
def test_each_other_condition_refuses_reuse(change: object, reason: str) -> None:
    conn = answered(connection())
    change(conn)  # type: ignore[operator]
    assert reuse_refusal(conn) == reason


def test_a_request_that_asked_for_an_upgrade_is_never_reused() -> None:
    """Even when the upstream refused it with a plain response: its parser may be past it."""
    assert reuse_refusal(answered(connection(upgrade=True))) == "upgrade"


def test_release_closes_what_it_may_not_pool() -> None:
    conn = answered(connection(framing=5))
    conn.pool.release(conn)
    assert conn.closed and not conn.pool.idle
