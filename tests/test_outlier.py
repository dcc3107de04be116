"""Outlier protection: the detector as a table of times, then the real proxy with a dead canary."""

from __future__ import annotations

import asyncio

import aiohttp

from canary_proxy.proxy.outlier import WINDOW, OutlierDetector

from .conftest import Backend, ProxyFactory
from .scrape import scrape
from .test_errors import dead_url


def test_failures_within_the_window_eject_for_the_cooldown() -> None:
    detector = OutlierDetector()
    assert [detector.failure(t, threshold=3, cooldown=30) for t in (0.0, 1.0)] == [False, False]
    assert detector.failure(9.0, threshold=3, cooldown=30)  # three within 10 s
    assert detector.ejected(9.0) and detector.ejected(38.9)
    assert not detector.failure(20.0, threshold=3, cooldown=30)  # not counted while ejected
    assert not detector.expired(38.9)
    assert detector.expired(39.0) and not detector.expired(39.5)  # true once
    assert not detector.ejected(39.0)
    assert [detector.failure(t, threshold=3, cooldown=30) for t in (40.0, 41.0)] == [False, False]


def test_failures_spread_wider_than_the_window_never_eject() -> None:
    detector = OutlierDetector()
    times = [i * (WINDOW / 2 + 0.1) for i in range(20)]  # never 3 within the window
    assert not any(detector.failure(t, threshold=3, cooldown=30) for t in times)


def test_zero_turns_it_off() -> None:
    detector = OutlierDetector()
    assert not any(detector.failure(float(t), threshold=0, cooldown=30) for t in range(100))
    assert not detector.ejected(100.0)


async def test_a_dead_canary_is_ejected_and_comes_back_after_the_cooldown(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    stable, _ = backends
    proxy = await proxy_factory(
        {
            "stable-url": stable.url,
            "canary-url": dead_url(),
            "canary-weight": 100,
            "canary-by-header": "X-Canary",
            "canary-outlier-failures": 3,
            "canary-outlier-cooldown": "2s",
        }
    )

    async def errors() -> float:
        m = await scrape(proxy)
        return m.value("canary_proxy_upstream_errors_total", version="canary", reason="connect")

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:

        async def get(**headers: str) -> str:
            async with client.get(proxy.url + "/", headers=headers) as r:
                assert r.status == 200
                return r.headers["X-Canary-Version"]

        for _ in range(3):  # each tries the canary, then fails over
            assert await get() == "stable"
        assert await errors() == 3
        await proxy.wait_log(lambda e: str(e.get("msg", "")).startswith("canary ejected for 2s"))
        assert (await scrape(proxy)).value("canary_proxy_outlier_ejections_total") == 1
        for _ in range(5):  # ejected: straight to stable, no connect attempt
            assert await get() == "stable"
        assert await errors() == 3
        assert await get(**{"X-Canary": "always"}) == "stable"  # forced: tried, then failed over
        assert await errors() == 4
        await asyncio.sleep(2.1)
        assert await get() == "stable"  # the cool-down is over: the canary is tried again
        assert await errors() == 5
        await proxy.wait_log(lambda e: "cool-down over" in str(e.get("msg", "")))
    m = await scrape(proxy)
    assert m.value("canary_proxy_routing_decisions_total", version="stable", rule="failover") == 10
