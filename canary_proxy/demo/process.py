"""The proxy the demo runs: ``canary-proxy serve`` as its own process, and the ports it needs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class StartError(Exception):
    """The demo could not start (a port in use, the proxy exited): exit 2."""


@dataclass
class ProxyProcess:
    process: asyncio.subprocess.Process
    url: str = ""
    admin: str = ""
    logs: deque[str] = field(default_factory=lambda: deque(maxlen=20))  # for a failure report
    reader: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()  # drains (--drain-delay 0) and exits
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)


async def start_proxy(source: Sequence[str], *, port: int, admin_port: int) -> ProxyProcess:
    """``canary-proxy serve`` with ``source`` (``--config FILE``, ``--config-dir DIR``);
    returns once it logs ``ready`` (StartError if it exits)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "canary_proxy", "serve", *source,
        "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin_port}",
        "--drain-delay", "0", "--shutdown-timeout", "2s", "--access-log", "off",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    proxy = ProxyProcess(process)
    assert process.stderr is not None
    ready = asyncio.get_running_loop().create_future()
    proxy.reader = asyncio.create_task(_read_log(process.stderr, proxy, ready))
    try:
        entry = await asyncio.wait_for(ready, 30)
    except (TimeoutError, EOFError):
        await proxy.stop()
        raise StartError("the proxy did not start:\n  " + "\n  ".join(proxy.logs)) from None
    proxy.url, proxy.admin = "http://" + entry["public"], "http://" + entry["admin"]
    return proxy


async def _read_log(stream: asyncio.StreamReader, proxy: ProxyProcess, ready: asyncio.Future[Any]) -> None:
    """Keep reading the proxy's log (a full pipe would stall it); the last lines explain a failure."""
    while line := await stream.readline():
        text = line.decode(errors="replace").rstrip()
        try:
            entry = json.loads(text)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            proxy.logs.append(text)  # e.g. "error: ..." lines of a bad start
            continue
        message = str(entry.get("msg", ""))
        proxy.logs.append(f"{message}: {entry['errors']}" if "errors" in entry else message)
        if not ready.done() and message == "ready":
            ready.set_result(entry)
    if not ready.done():
        ready.set_exception(EOFError())


def check_free(port: int, flag: str) -> None:
    """A chosen port that is taken is a StartError with a plain message (not the proxy's traceback)."""
    if port == 0:
        return
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy binds it
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise StartError(f"{flag} {port}: 127.0.0.1:{port} is not free ({exc.strerror})") from None
