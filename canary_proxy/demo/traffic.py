"""The demo's users: browser-like ones who keep the proxy's sticky cookie, and QA ones with the header."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

import aiohttp

HEADER: Final = "X-Canary"  # QA users send "always"; every service's config routes on it

# 32 browser users at ~4 requests/s each and 6 QA users: ~160 requests/s in all, so even at
# 5% (or slowed down) the canary serves over --min-requests in one check interval at --speed 2.5.
USERS: Final = 32
QA_USERS: Final = 6
THINK: Final = (0.05, 0.15)  # seconds a user waits between two requests
VISIT: Final = (20, 60)  # requests a user makes before leaving (a new user takes the seat)


@dataclass
class Traffic:
    """Browser-like users who keep the proxy's sticky cookie, and QA users with the header."""

    url: str
    session: aiohttp.ClientSession
    host: str | None = None  # the Host header that routes to this service; None: any
    rng: random.Random = field(default_factory=random.Random)
    on_version: Counter[str] = field(default_factory=Counter)  # browser users now on each version
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._browser()) for _ in range(USERS)]
        self.tasks += [asyncio.create_task(self._qa()) for _ in range(QA_USERS)]

    async def close(self) -> None:
        self.stop.set()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _get(self, headers: dict[str, str]) -> aiohttp.ClientResponse | None:
        if self.host is not None:
            headers = {**headers, "Host": self.host}
        try:
            async with self.session.get(self.url + "/", headers=headers) as response:
                await response.read()
                return response
        except (aiohttp.ClientError, TimeoutError):
            await asyncio.sleep(0.2)  # the proxy is restarting or gone; do not spin
            return None

    async def _pause(self) -> None:
        await asyncio.sleep(self.rng.uniform(*THINK))

    async def _browser(self) -> None:
        """One seat: a user visits for a while with their cookie, leaves, and a new one comes."""
        while not self.stop.is_set():
            cookie: str | None = None
            version: str | None = None
            for _ in range(self.rng.randint(*VISIT)):
                response = await self._get({"Cookie": cookie} if cookie else {})
                if response is not None:
                    if (morsel := response.cookies.get("canary_proxy_bucket")) is not None:
                        cookie = f"canary_proxy_bucket={morsel.value}"
                    served = response.headers.get("X-Canary-Version")
                    if served != version:
                        if version is not None:
                            self.on_version[version] -= 1
                        if served is not None:
                            self.on_version[served] += 1
                        version = served
                await self._pause()
            if version is not None:
                self.on_version[version] -= 1

    async def _qa(self) -> None:
        while not self.stop.is_set():
            await self._get({HEADER: "always"})
            await self._pause()
