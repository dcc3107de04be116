"""Access log: one JSON object per request on stdout, written line by line, never buffered."""

from __future__ import annotations

import json
import os
import time
from typing import Protocol

# A path longer than this is cut in the log, so one line stays within PIPE_BUF-ish sizes and
# lines from several workers sharing stdout never interleave.
MAX_LOGGED_PATH = 2048


class _Exchange(Protocol):
    method: str
    path: str
    client: str
    version: str
    rule: str
    status: int
    upstream_seconds: float | None
    bytes_in: int
    bytes_out: int
    request_id: str


def rfc3339(now: float) -> str:
    seconds = int(now)
    millis = int((now - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class AccessLog:
    """Writes each record with one write(2) so lines from many workers never interleave."""

    def __init__(self, fd: int = 1) -> None:
        self._fd = fd
        # A non-blocking stdout would make a full pipe drop lines or spin; blocking, a slow
        # log reader slows us down instead (like any log shipper's backpressure).
        os.set_blocking(fd, True)

    def write(self, ex: _Exchange, seconds: float) -> None:
        path = ex.path
        record = {
            "time": rfc3339(time.time()),
            "method": ex.method,
            "path": path if len(path) <= MAX_LOGGED_PATH else path[:MAX_LOGGED_PATH] + "...",
            "status": ex.status,
            "version": ex.version,
            "rule": ex.rule,
            "upstream_seconds": _round(ex.upstream_seconds),
            "duration_seconds": _round(seconds),
            "bytes_in": ex.bytes_in,
            "bytes_out": ex.bytes_out,
            "client": ex.client,
            "request_id": ex.request_id,
        }
        # json.dumps escapes CR, LF and every other control character: no log injection.
        self._emit((json.dumps(record, ensure_ascii=True) + "\n").encode())

    def _emit(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except OSError:
                return  # stdout is gone (closed pipe): logging must never break serving
            view = view[written:]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
