"""``--workers 2``: one supervisor, two SO_REUSEPORT workers, metrics summed, crashes healed."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import multiprocess

from .conftest import Backend, ProxyFactory, ProxyProcess, base_config
from .scrape import Scrape, wait_metric


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(c) for c in (task / "children").read_text().split())
    return found


def multiproc_dir(worker_pid: int) -> Path:
    """The supervisor's prometheus multiprocess directory, from a worker's environment."""
    environ = Path(f"/proc/{worker_pid}/environ").read_bytes().split(b"\0")
    for entry in environ:
        name, _, value = entry.partition(b"=")
        if name == b"PROMETHEUS_MULTIPROC_DIR":
            return Path(value.decode())
    raise AssertionError("worker has no PROMETHEUS_MULTIPROC_DIR")


def worker_requests(directory: Path, pid: int) -> float:
    """Requests one worker counted, read from its own counter file alone."""
    total = 0.0
    for metric in multiprocess.MultiProcessCollector.merge([str(directory / f"counter_{pid}.db")]):
        total += sum(s.value for s in metric.samples if s.name == "canary_proxy_requests_total")
    return total


async def fan_out(url: str, n: int) -> dict[str, int]:
    """``n`` GETs, each on a new connection so the kernel spreads them over the workers."""
    versions: dict[str, int] = {}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
        for _ in range(n):
            async with session.get(url + "/") as r:
                assert r.status == 200
                await r.read()
                version = r.headers["X-Canary-Version"]
                versions[version] = versions.get(version, 0) + 1
    return versions


def total_requests(m: Scrape) -> float:
    return sum(m.series("canary_proxy_requests_total").values())


async def counted(proxy: ProxyProcess, n: int) -> Scrape:
    """Wait until /metrics shows ``n`` requests: a worker counts one just after its last byte."""
    return await wait_metric(proxy, lambda m: total_requests(m) == n, what=f"{n} requests")


async def reload_everywhere(proxy: ProxyProcess, config: dict[str, Any], workers: int) -> None:
    """Reload, then wait until every worker says it applied the new config."""
    mark = len(proxy.logs)
    await proxy.reload(config)
    applied: set[int] = set()

    def all_applied(entry: dict[str, Any]) -> bool:
        if entry.get("msg") == "worker applied config":
            applied.add(entry["worker_pid"])
        return len(applied) == workers

    await proxy.wait_log(all_applied, since=mark)


async def test_two_workers_sum_their_metrics_and_all_take_a_reload(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary, canary_weight=25), "--workers", "2")
    workers = children(proxy.pid)
    assert len(workers) == 2

    n = 60
    versions = await fan_out(proxy.url, n)
    m = await counted(proxy, n)
    for version in ("stable", "canary"):
        want = versions.get(version, 0)
        got = m.get("canary_proxy_requests_total", version=version, code="200", method="GET")
        assert (got or 0) == want, version
        assert m.value("canary_proxy_request_duration_seconds_count", version=version) == want
        assert m.value("canary_proxy_in_flight_requests", version=version) == 0
    assert all("pid" not in dict(labels) for _, labels in m.samples)
    assert m.value("canary_proxy_canary_weight_ratio") == 0.25
    assert m.value("canary_proxy_config_reloads_total", result="success") == 1
    assert m.value("canary_proxy_config_reloads_total", result="failure") == 0
    # Both workers served, so the total above really is a sum. Each of the 60 connections
    # picks a worker by its 4-tuple hash: all on one worker has probability 2 * 2**-60.
    directory = multiproc_dir(next(iter(workers)))
    per_worker = [worker_requests(directory, pid) for pid in workers]
    assert all(count > 0 for count in per_worker), per_worker
    assert sum(per_worker) == n

    await reload_everywhere(proxy, base_config(stable, canary, canary_weight=100), 2)
    assert await fan_out(proxy.url, 40) == {"canary": 40}
    m = await counted(proxy, n + 40)
    assert m.value("canary_proxy_canary_weight_ratio") == 1.0
    assert m.value("canary_proxy_config_reloads_total", result="success") == 2


async def test_a_killed_worker_is_restarted_logged_and_counted(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary), "--workers", "2")
    before = children(proxy.pid)
    assert len(before) == 2
    assert await fan_out(proxy.url, 10) == {"stable": 10}
    await counted(proxy, 10)  # before the kill, so the victim's share is on record

    victim = min(before)
    mark = len(proxy.logs)
    os.kill(victim, signal.SIGKILL)
    died = await proxy.wait_log(lambda e: "exited with" in str(e.get("msg")), since=mark)
    assert died["level"] == "error" and f"pid {victim}" in died["msg"], died
    # The replacement logs when its listener is up.
    await proxy.wait_log(lambda e: str(e.get("msg")).startswith("proxy listening"), since=mark)
    after = children(proxy.pid)
    assert len(after) == 2 and victim not in after

    assert await fan_out(proxy.url, 20) == {"stable": 20}
    # The dead worker's counts survive it: the total is still every request served.
    m = await counted(proxy, 30)
    assert m.value("canary_proxy_worker_restarts_total") == 1
    assert m.value("canary_proxy_requests_total", version="stable", code="200", method="GET") == 30
    assert m.value("canary_proxy_in_flight_requests", version="stable") == 0
    async with aiohttp.ClientSession() as session, session.get(proxy.admin_url + "/readyz") as r:
        assert r.status == 200


async def test_workers_auto_means_one_per_usable_cpu(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary), "--workers", "auto")
    cpus = len(os.sched_getaffinity(proxy.pid))
    # One CPU runs the single-process mode: no supervisor, no worker processes.
    assert len(children(proxy.pid)) == (cpus if cpus > 1 else 0)
    assert await fan_out(proxy.url, 4) == {"stable": 4}


async def config_weight(proxy: ProxyProcess) -> Any:
    return (await proxy.admin_json("/config"))["canary-weight"]


async def test_config_shows_a_reload_only_once_every_worker_applied_it(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary, canary_weight=25), "--workers", "2")
    slow = min(children(proxy.pid))
    os.kill(slow, signal.SIGSTOP)  # it cannot read the new config until it continues
    try:
        mark = len(proxy.logs)
        await proxy.reload(base_config(stable, canary, canary_weight=75))
        await proxy.wait_log(
            lambda e: e.get("msg") == "worker applied config" and e["worker_pid"] != slow, since=mark
        )
        # One worker serves 75 already, the other still 25: /config says what all may get.
        assert await config_weight(proxy) == 25
    finally:
        os.kill(slow, signal.SIGCONT)
    await proxy.wait_log(
        lambda e: e.get("msg") == "worker applied config" and e["worker_pid"] == slow, since=mark
    )
    deadline = asyncio.get_running_loop().time() + 5
    while (weight := await config_weight(proxy)) != 75:  # the supervisor reads its status pipe
        assert asyncio.get_running_loop().time() < deadline, weight
        await asyncio.sleep(0.02)
