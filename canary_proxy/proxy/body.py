"""A request body on its way upstream: what the client sent before its exchange could take
it, each new piece as the client's parser reads it, and -- on a pooled connection, which may
turn out stale -- a copy of what was sent, so that a retry can resend it whole."""

from __future__ import annotations

from typing import Final, Protocol

from .mirror import Copy
from .request import Request
from .upstream import UpstreamConnection

REPLAY_LIMIT: Final = 64 << 10  # request body kept for a retry after a stale pooled connection


class Holder(Protocol):
    """Whoever holds the attempt's upstream connection (the Cycle): None once answered."""

    upstream: UpstreamConnection | None


class BodyRelay:
    """The ``BodySink`` of one request (``Request.relay`` once attached)."""

    __slots__ = ("bytes_in", "forwarded", "holder", "mirror", "replay", "request")

    def __init__(self, request: Request, holder: Holder) -> None:
        self.request = request
        self.holder = holder
        self.forwarded = 0  # body bytes written upstream, this attempt
        # What this attempt sent on a pooled connection, kept (up to REPLAY_LIMIT) so that a
        # retry on a fresh connection can resend it whole; None once it grew past the limit.
        self.replay: list[bytes] | None = []
        self.bytes_in = 0  # body bytes received from the client
        self.mirror: Copy | None = None  # collecting the body of a copy for the canary

    @property
    def whole(self) -> bool:
        """The body sent so far can be sent again in full: none was, or all of it was kept."""
        return self.forwarded == 0 or self.replay is not None

    def attach(self, upstream: UpstreamConnection, *, reused: bool, retried: bool) -> None:
        """Send what the client sent so far; then relay each new piece as it is parsed. On a
        retry, what the first attempt sent goes first (the caller checked ``whole``)."""
        request = self.request
        sent = (self.replay or []) if retried else []
        self.replay = [] if reused else None  # only a pooled connection can turn out stale
        self.forwarded = 0
        for data in sent:
            self._forward(upstream, data)
        buffered, request.buffer = request.buffer, []
        request.buffered = 0
        request.relay = self
        for data in buffered:
            self.request_body(data)
        if request.body_done:
            self.request_body(b"")

    def detach(self) -> None:
        """Between attempts: what arrives meanwhile is buffered for the next one."""
        self.request.relay = None

    def request_body(self, data: bytes) -> None:
        """A piece of the request body as the client's parser reads it; ``b""`` ends it."""
        mirror = self.mirror
        if mirror is not None:
            mirror.feed(data)
        upstream = self.holder.upstream
        if not data:
            if upstream is not None:
                upstream.end_body()
            return
        self.bytes_in += len(data)
        if upstream is not None:  # else answered already: the rest is read, not relayed
            self._forward(upstream, data)

    def _forward(self, upstream: UpstreamConnection, data: bytes) -> None:
        self.forwarded += len(data)
        replay = self.replay
        if replay is not None:
            if self.forwarded <= REPLAY_LIMIT:
                replay.append(data)  # a reference, not a copy: bytes are immutable
            else:
                self.replay = None
        upstream.write_body(data)
