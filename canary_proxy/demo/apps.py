"""The demo's two apps, stable ``v1`` and canary ``v2``, and the fault that makes a bad canary fail."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

# Each app answers in 110-170 ms, so healthy requests land in the 150-200 ms buckets for
# both versions (p99 reads about 200 ms): the p99-vs-stable check (2x) then trips only on a
# real stall (over ~400 ms), not on scheduler noise of a busy laptop. A slow canary adds 500 ms.
BASE_LATENCY: Final = (0.11, 0.17)
SLOW_EXTRA: Final = 0.5
ERROR_SHARE: Final = 0.4  # a failing canary answers 500 to this share of its requests


@dataclass
class Fault:
    """What a bad canary does, and whether it has started yet (it never stops: a bad build stays bad)."""

    mode: str | None
    fail_at: float
    active: bool = False

    def reached(self, percent: float) -> bool:
        """Note the weight the proxy serves now; True when this makes the fault start."""
        if self.mode is None or self.active or percent < self.fail_at:
            return False
        self.active = True
        return True


@dataclass
class DemoApp:
    version: str  # "v1" or "v2"
    fault: Fault | None = None
    app: str = "demo"  # the service it belongs to, in its answers
    rng: random.Random = field(default_factory=random.Random)
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.Response:
        delay = self.rng.uniform(*BASE_LATENCY)
        fault = self.fault
        if fault is not None and fault.active and fault.mode == "latency":
            delay += SLOW_EXTRA
        await asyncio.sleep(delay)
        if fault is not None and fault.active and fault.mode == "errors" and self.rng.random() < ERROR_SHARE:
            return web.json_response({"app": self.app, "version": self.version, "error": "boom"}, status=500)
        return web.json_response({"app": self.app, "version": self.version, "path": request.path})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
