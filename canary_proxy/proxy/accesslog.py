"""Access log: one JSON object per request on stdout; a loop iteration's lines are written
together once it is done, in whole lines."""

from __future__ import annotations

import asyncio
import functools
import os
import select
import stat
import time
from json.encoder import encode_basestring_ascii as _q  # the C encoder
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
    route: str
    status: int
    upstream_seconds: float | None
    bytes_in: int
    bytes_out: int
    request_id: str


_last_millis: tuple[int, str] = (-1, "")


def rfc3339(now: float) -> str:
    # Formatted once per millisecond: at tens of thousands of requests a second, most lines
    # share their millisecond with the one before.
    global _last_millis
    stamp = int(now * 1000)
    if stamp != _last_millis[0]:
        seconds, millis = divmod(stamp, 1000)
        _last_millis = (stamp, _second(seconds) + f".{millis:03d}Z")
    return _last_millis[1]


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    """strftime once per second, not once per request."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


class AccessLog:
    """Buffers the lines of one loop iteration and writes them at its end, whole lines per
    write(2): a write(2) per request cost about a tenth of the proxy's time.

    Lines from many workers never interleave: on a pipe (or socket, or terminal) each write is
    at most PIPE_BUF bytes, which POSIX makes atomic; a regular file is opened O_APPEND, and
    Linux makes each write to it atomic, whatever its size.
    """

    def __init__(self, fd: int = 1) -> None:
        self._fd = fd
        # A non-blocking stdout would make a full pipe drop lines or spin; blocking, a slow
        # log reader slows us down instead (like any log shipper's backpressure).
        os.set_blocking(fd, True)
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        self._max_write = 1 << 16 if regular else select.PIPE_BUF
        self._lines: list[bytes] = []
        self._size = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def write(self, ex: _Exchange, seconds: float) -> None:
        path = ex.path
        if len(path) > MAX_LOGGED_PATH:
            path = path[:MAX_LOGGED_PATH] + "..."
        # Formatted by hand: this runs once per request, and json.dumps of a dict costs several
        # times more. Every client-controlled string goes through the JSON string encoder, which
        # escapes quotes, backslashes, CR, LF and every other control character: no log injection.
        upstream = "null" if ex.upstream_seconds is None else f"{ex.upstream_seconds:.6f}"
        line = (
            f'{{"time": "{rfc3339(time.time())}", "method": {_q(ex.method)}, "path": {_q(path)}, '
            f'"status": {ex.status}, "route": {_q(ex.route)}, "version": "{ex.version}", '
            f'"rule": "{ex.rule}", '
            f'"upstream_seconds": {upstream}, "duration_seconds": {seconds:.6f}, '
            f'"bytes_in": {ex.bytes_in}, "bytes_out": {ex.bytes_out}, "client": {_q(ex.client)}, '
            f'"request_id": {_q(ex.request_id)}}}\n'
        )
        self._add(line.encode())

    def _add(self, line: bytes) -> None:
        if not self._lines:
            try:  # cached: asyncio.get_running_loop() costs a getpid(2) syscall
                loop = self._loop if self._loop is not None else asyncio.get_running_loop()
            except RuntimeError:  # no event loop: nothing would flush later
                self._emit(line)
                return
            self._loop = loop
            loop.call_soon(self.flush)
        if self._size + len(line) > self._max_write:
            self.flush()  # what is held already, so each write stays within _max_write
        self._lines.append(line)
        self._size += len(line)

    def flush(self) -> None:
        """Write the lines held; also called at shutdown, after the last request."""
        if self._lines:
            data = b"".join(self._lines)
            self._lines.clear()
            self._size = 0
            self._emit(data)

    def _emit(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except OSError:
                return  # stdout is gone (closed pipe): logging must never break serving
            view = view[written:]
