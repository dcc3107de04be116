"""Helpers for rollout tests: the rollout CLI as a process, a traffic generator, state readers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from canary_proxy.metrics import exposition

from .conftest import Backend, ProxyFactory, ProxyProcess, base_config

# Both versions answer after this long. Every request then lands in the (100, 250] ms latency
# bucket, so the 2x-of-stable p99 limit trips only for a stall of more than ~400 ms, not for
# scheduler noise on a busy 2-core machine; 32 users make ~250 requests/s.
LATENCY = 0.12
USERS = 32

# Short clocks for tests; the documented defaults are minutes.
FAST = (
    "--interval", "0.5s",
    "--step-duration", "1s",
    "--min-requests", "10",
    "--failure-threshold", "2",
    "--progress-deadline", "10s",
)  # fmt: skip


@dataclass
class RolloutProcess:
    """``canary-proxy rollout ...`` running; its JSON log lines are collected as they come."""

    process: asyncio.subprocess.Process
    logs: list[dict[str, Any]] = field(default_factory=list)
    _event: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    @property
    def messages(self) -> list[str]:
        return [str(e.get("msg", e.get("raw", ""))) for e in self.logs]

    async def wait_log(self, predicate: Callable[[str], bool], timeout: float = 15) -> dict[str, Any]:
        """The first log entry whose message satisfies ``predicate`` (already seen or to come)."""

        async def scan() -> dict[str, Any]:
            seen = 0
            while True:
                for entry in self.logs[seen:]:
                    if predicate(str(entry.get("msg", ""))):
                        return entry
                seen = len(self.logs)
                self._event.clear()
                if self._reader is not None and self._reader.done():
                    raise AssertionError(f"rollout exited with {self.process.returncode}: {self.messages}")
                await self._event.wait()

        try:
            return await asyncio.wait_for(scan(), timeout)
        except TimeoutError:
            raise AssertionError(f"no such log line in {timeout}s: {self.messages[-12:]}") from None

    async def exit_code(self, timeout: float = 20) -> int:
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"rollout still running after {timeout}s: {self.messages[-10:]}") from None
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return code

    async def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        await self.process.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


async def _read(process: RolloutProcess) -> None:
    assert process.process.stderr is not None
    while line := await process.process.stderr.readline():
        try:
            entry = json.loads(line)
        except ValueError:
            entry = {"raw": line.decode(errors="replace")}
        process.logs.append(entry)
        process._event.set()
    process._event.set()


async def start_rollout(*args: str) -> RolloutProcess:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "canary_proxy", "rollout", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=dict(os.environ),
    )  # fmt: skip
    rollout = RolloutProcess(process)
    rollout._reader = asyncio.create_task(_read(rollout))
    return rollout


@contextlib.asynccontextmanager
async def rollout(*args: str) -> AsyncIterator[RolloutProcess]:
    """A rollout process for the block; killed at the end if it is still running."""
    process = await start_rollout(*args)
    try:
        yield process
    finally:
        await process.kill()


async def cli(*args: str, timeout: float = 20) -> tuple[int, str, str]:
    """Run ``canary-proxy ARGS`` to completion: (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "canary_proxy", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ),
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@dataclass
class Traffic:
    """Concurrent new users (no cookies) hitting the proxy until stopped; counts by version."""

    url: str
    concurrency: int = USERS
    headers: dict[str, str] = field(default_factory=dict)
    versions: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def _user(self, session: aiohttp.ClientSession) -> None:
        while not self._stop.is_set():
            try:
                async with session.get(self.url + "/", headers=self.headers) as response:
                    await response.read()
                    self.statuses[response.status] += 1
                    self.versions[response.headers.get("X-Canary-Version", "?")] += 1
            except aiohttp.ClientError:
                self.statuses[0] += 1
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def traffic(
    url: str, concurrency: int = USERS, headers: dict[str, str] | None = None
) -> AsyncIterator[Traffic]:
    load = Traffic(url, concurrency, headers or {})
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        load._tasks = [asyncio.create_task(load._user(session)) for _ in range(concurrency)]
        try:
            yield load
        finally:
            load._stop.set()
            await asyncio.wait_for(asyncio.gather(*load._tasks, return_exceptions=True), 10)


def file_state(config_path: Path) -> tuple[Any, dict[str, str]]:
    """(canary-weight in the config file, the rollout state beside it)."""
    config = yaml.safe_load(config_path.read_text())
    state_path = config_path.with_name(config_path.name + ".rollout.json")
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    return config.get("canary-weight", 0), state


def weights_loaded(proxy_logs: list[dict[str, Any]], key: str = "canary-weight") -> list[Any]:
    """Each canary-weight (or other ``key``) the proxy loaded, in order (a repeat once)."""
    loaded = [e["effective"][key] for e in proxy_logs if str(e.get("msg", "")).startswith("config loaded")]
    return [w for i, w in enumerate(loaded) if i == 0 or loaded[i - 1] != w]


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start


async def rollout_proxy(backends: tuple[Backend, Backend], proxy_factory: ProxyFactory) -> ProxyProcess:
    """The proxy the file-mode rollout tests drive: both backends answer in LATENCY, weight 0."""
    stable, canary = backends
    stable.delay = canary.delay = LATENCY
    return await proxy_factory(base_config(stable, canary, canary_weight=0), "--access-log", "off")


def rollout_args(proxy: ProxyProcess, steps: str, *extra: str) -> list[str]:
    """``rollout`` arguments for that proxy in file mode, scraping its /metrics, short clocks."""
    return [
        "--config", str(proxy.config_path),
        "--metrics-url", proxy.admin_url + "/metrics",
        "--steps", steps,
        *FAST,
        *extra,
    ]  # fmt: skip


@contextlib.asynccontextmanager
async def metrics_page(
    registry: CollectorRegistry, before: Callable[[], None] = lambda: None
) -> AsyncIterator[int]:
    """A /metrics page on a free loopback port (yielded) from ``registry``, written as the
    admin port writes it (``exposition``), calling ``before`` at each scrape: a proxy's real
    exposition that grows as a scraper watches it."""

    async def page(request: web.Request) -> web.Response:
        before()
        return web.Response(body=exposition(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
