"""Fixtures: real backends on loopback, the real proxy process, and small helpers.

Backends run in the test's event loop (real sockets); the proxy always runs as its own
process started through its real CLI, exactly as users run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

pytest_plugins = ["tests.fakekube", "tests.rawupstream"]  # fixtures: ``fake_kube``, ``raw_upstreams``

# -- backends --------------------------------------------------------------------------------


@dataclass
class Backend:
    """An echo server that says which version it is and what it received."""

    name: str
    url: str = ""
    port: int = 0
    hits: int = 0
    fail_status: int | None = None  # answer every request with this status
    delay: float = 0.0  # seconds before answering
    requests: list[dict[str, Any]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


BACKEND = web.AppKey("backend", Backend)


async def _echo(request: web.Request) -> web.StreamResponse:
    backend = request.app[BACKEND]
    backend.hits += 1
    if backend.delay:
        await asyncio.sleep(backend.delay)
    if backend.fail_status is not None:
        return web.Response(status=backend.fail_status, text=f"{backend.name} failing\n")
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
    record = {
        "version": backend.name,
        "method": request.method,
        "path": request.raw_path,
        "headers": [[k, v] for k, v in request.headers.items()],
        "body_bytes": size,
    }
    backend.requests.append(record)
    return web.json_response(record, headers={"Set-Cookie": "app=1", "X-Backend": backend.name})


async def _bytes(request: web.Request) -> web.StreamResponse:
    """Stream N bytes in 64 KiB chunks with a Content-Length."""
    request.app[BACKEND].hits += 1
    total = int(request.match_info["n"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = total
    await response.prepare(request)
    if request.method == "HEAD":  # a correct server sends no body; aiohttp would write one
        return response
    chunk = b"x" * 65536
    sent = 0
    while sent < total:
        part = chunk[: min(65536, total - sent)]
        await response.write(part)
        sent += len(part)
    await response.write_eof()
    return response


async def _reset(request: web.Request) -> web.StreamResponse:
    """Send headers promising 1 MB and part of the body, then reset the connection."""
    request.app[BACKEND].hits += 1
    response = web.StreamResponse()
    response.content_length = 1_000_000
    await response.prepare(request)
    await response.write(b"y" * 1000)
    await asyncio.sleep(0.05)
    assert request.transport is not None
    send_rst_on_close(request.transport.get_extra_info("socket"))
    request.transport.abort()
    return response


def send_rst_on_close(sock: Any) -> None:
    """SO_LINGER 0: closing the socket sends a TCP RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _ws(request: web.Request) -> web.StreamResponse:
    backend = request.app[BACKEND]
    backend.hits += 1
    ws = web.WebSocketResponse(protocols=("chat",))
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT:
            if msg.data == "close-me":
                await ws.close(code=4001, message=b"bye")
                break
            await ws.send_str(f"{backend.name}:{msg.data}")
        elif msg.type == aiohttp.WSMsgType.BINARY:
            await ws.send_bytes(msg.data[::-1])
    return ws


def backend_app(backend: Backend) -> web.Application:
    app = web.Application(client_max_size=0)
    app[BACKEND] = backend
    app.router.add_route("*", "/bytes/{n:\\d+}", _bytes)
    app.router.add_get("/reset", _reset)
    app.router.add_get("/ws", _ws)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


async def start_backend(name: str, port: int = 0, *, ssl_context: ssl.SSLContext | None = None) -> Backend:
    """``ssl_context``: serve HTTPS with it (the URL is then ``https://``)."""
    backend = Backend(name)
    runner = web.AppRunner(backend_app(backend), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context)
    await site.start()
    backend.runner = runner
    backend.port = runner.addresses[0][1]
    backend.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{backend.port}"
    return backend


@pytest.fixture
async def backends() -> AsyncIterator[tuple[Backend, Backend]]:
    stable, canary = await start_backend("stable"), await start_backend("canary")
    yield stable, canary
    await stable.stop()
    await canary.stop()


@pytest.fixture
async def four() -> AsyncIterator[list[Backend]]:
    """Two services, each a stable and a canary backend."""
    backends = [await start_backend(name) for name in ("shop-v1", "shop-v2", "blog-v1", "blog-v2")]
    yield backends
    for backend in backends:
        await backend.stop()


# -- the proxy process -----------------------------------------------------------------------


@dataclass
class ProxyProcess:
    process: asyncio.subprocess.Process
    config_path: Path
    logs: list[dict[str, Any]] = field(default_factory=list)
    access: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    admin_url: str = ""
    last_written: dict[str, Any] | None = None
    _log_event: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def write_config(self, config: dict[str, Any]) -> None:
        """Replace the config file atomically (write a temp file, rename over)."""
        write_config_file(self.config_path, config)

    async def reload(self, config: dict[str, Any], *, expect_ok: bool = True) -> dict[str, Any]:
        """Write a new config and wait for the proxy's log line that accepts (or rejects) it.

        Writing the same bytes again is no change, so the proxy says nothing: return at once.
        """
        if config == self.last_written:
            return {}
        self.last_written = dict(config)
        mark = len(self.logs)
        self.write_config(config)
        entry = await self.wait_log(
            lambda e: str(e.get("msg", "")).startswith(("config loaded", "rejected new config")),
            since=mark,
        )
        assert entry["msg"].startswith("config loaded") == expect_ok, entry
        return entry

    async def wait_log(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10, *, since: int = 0
    ) -> dict[str, Any]:
        async def scan() -> dict[str, Any]:
            seen = since
            while True:
                for entry in self.logs[seen:]:
                    if predicate(entry):
                        return entry
                seen = len(self.logs)
                self._log_event.clear()
                if self.process.returncode is not None and seen == len(self.logs):
                    raise AssertionError(f"proxy exited with {self.process.returncode}: {self.logs}")
                await self._log_event.wait()

        return await asyncio.wait_for(scan(), timeout)

    async def terminate(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await asyncio.wait_for(asyncio.gather(*self._tasks), timeout)  # every log line read
        return code

    async def admin_json(self, path: str) -> Any:
        async with aiohttp.ClientSession() as session, session.get(self.admin_url + path) as r:
            return await r.json()

    async def metrics_text(self) -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.admin_url + "/metrics") as r,
        ):
            assert r.status == 200
            return await r.text()


async def stats_until(
    proxy: ProxyProcess,
    check: Callable[[dict[str, Any]], bool],
    timeout: float = 10,
    *,
    path: str = "/stats",
) -> dict[str, Any]:
    """Poll /stats (one new point a second) until ``check`` holds, bounded."""
    deadline = time.monotonic() + timeout
    while True:
        stats: dict[str, Any] = await proxy.admin_json(path)
        if check(stats):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"/stats never satisfied the check in {timeout}s: {stats}")
        await asyncio.sleep(0.2)


def write_config_file(path: Path, config: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config))
    os.replace(tmp, path)


async def _read_lines(
    stream: asyncio.StreamReader, sink: list[dict[str, Any]], event: asyncio.Event | None
) -> None:
    while line := await stream.readline():
        try:
            entry = json.loads(line)
        except ValueError:
            entry = {"raw": line.decode(errors="replace")}
        sink.append(entry)
        if event is not None:
            event.set()
    if event is not None:
        event.set()


async def start_proxy(
    config: dict[str, Any] | None,
    tmp_path: Path,
    *args: str,
    config_path: Path | None = None,
    wait_ready: bool = True,
    env: dict[str, str] | None = None,
    use_config: bool = True,
) -> ProxyProcess:
    """Start ``canary-proxy serve`` on free loopback ports; ``use_config=False`` leaves the
    source to ``args`` (e.g. ``--configmap``)."""
    path = config_path or tmp_path / f"canary-{os.urandom(4).hex()}.yaml"
    if config is not None:
        write_config_file(path, config)
    source = ["--config", str(path)] if use_config else []
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "canary_proxy",
        "serve",
        *source,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--drain-delay",
        "0",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=1 << 20,
        env={**os.environ, **(env or {})},
    )
    proxy = ProxyProcess(process, path, last_written=config)
    assert process.stdout is not None and process.stderr is not None
    proxy._tasks = [
        asyncio.create_task(_read_lines(process.stderr, proxy.logs, proxy._log_event)),
        asyncio.create_task(_read_lines(process.stdout, proxy.access, None)),
    ]
    if wait_ready:
        ready = await proxy.wait_log(lambda e: e.get("msg") == "ready", timeout=20)
        proxy.url = "http://" + ready["public"]
        proxy.admin_url = "http://" + ready["admin"]
    return proxy


async def stop_proxy(proxy: ProxyProcess) -> None:
    if proxy.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proxy.process.kill()
    await proxy.process.wait()
    await asyncio.gather(*proxy._tasks, return_exceptions=True)


ProxyFactory = Callable[..., Awaitable[ProxyProcess]]


@pytest.fixture
async def proxy_factory(tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    started: list[ProxyProcess] = []

    async def factory(config: dict[str, Any] | None, *args: str, **kwargs: Any) -> ProxyProcess:
        proxy = await start_proxy(config, tmp_path, *args, **kwargs)
        started.append(proxy)
        return proxy

    yield factory
    for proxy in started:
        await stop_proxy(proxy)


def base_config(stable: Backend, canary: Backend, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"stable-url": stable.url, "canary-url": canary.url}
    config.update({k.replace("_", "-"): v for k, v in extra.items()})
    return config


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that keeps no cookies: every request is a new user unless it sends one."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


async def raw_request(port: int, data: bytes, *, timeout: float = 5) -> bytes:
    """Send raw bytes on a fresh connection and read until the server closes or goes quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks: list[bytes] = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                break
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return b"".join(chunks)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM) so far, in MiB: exact, no sampling."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")
