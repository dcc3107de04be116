"""A parsed request: its head, and its body as it arrives. A plain record, no I/O."""

from __future__ import annotations

from typing import Protocol


class BodySink(Protocol):
    """Where a request's body goes once its exchange has begun (``Cycle.request_body``)."""

    def request_body(self, data: bytes) -> None: ...  # b"" ends the body


class Request:
    """A parsed request head, and its body as it arrives."""

    __slots__ = (
        "body_done",
        "body_limit",
        "buffer",
        "buffered",
        "chunked",
        "content_length",
        "headers",
        "keep_alive",
        "lookup",
        "method",
        "received",
        "relay",
        "repeated",
        "upgrade",
        "upgrade_rest",
        "url",
        "version",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.lookup: dict[bytes, bytes] = {}  # lower-case name -> last value, for the few we read
        self.method = ""
        self.version = "1.1"
        self.keep_alive = True
        self.upgrade = False  # a WebSocket handshake
        self.upgrade_rest = b""  # what the client sent after it, before the upstream's 101
        self.chunked = False
        self.content_length: int | None = None
        self.buffer: list[bytes] = []  # body read before its exchange could take it
        self.buffered = 0
        self.received = 0  # body bytes, counted only when there is a size limit to enforce
        self.body_limit = 0  # its route's (or the proxy's) body limit in bytes; 0 = none
        self.body_done = False
        self.repeated = False  # a field that may come once (Host, Transfer-Encoding) came twice
        self.relay: BodySink | None = None  # set once the exchange takes the body as it comes

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)
