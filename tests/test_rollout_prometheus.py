"""Rollouts analysed by a real Prometheus scraping the real proxy (Debian package ``prometheus``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from canary_proxy.metrics import Metrics
from canary_proxy.rollout.analysis import Window
from canary_proxy.rollout.sources import PrometheusSource

from .conftest import Backend, ProxyFactory, ProxyProcess, base_config
from .rollouts import FAST, LATENCY, file_state, metrics_page, rollout, traffic


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_prometheus_config(path: Path, target: str) -> None:
    path.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: canary-proxy\n    static_configs: [{{targets: ['{target}']}}]\n"
    )


async def wait_target_up(url: str, timeout: float = 20) -> None:
    """Poll the targets API (Prometheus has no event to await) until the proxy is scraped."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url + "/api/v1/targets") as r:
                    targets = (await r.json())["data"]["activeTargets"]
                    if targets and targets[0]["health"] == "up":
                        return
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus at {url} did not scrape the proxy in {timeout}s")
            await asyncio.sleep(0.1)


@pytest.fixture
async def proxy(backends: tuple[Backend, Backend], proxy_factory: ProxyFactory) -> ProxyProcess:
    stable, canary = backends
    stable.delay = canary.delay = LATENCY
    return await proxy_factory(base_config(stable, canary, canary_weight=0), "--access-log", "off")


@pytest.fixture
async def prometheus(proxy: ProxyProcess, tmp_path: Path) -> AsyncIterator[str]:
    async with run_prometheus(proxy.admin_url.removeprefix("http://"), tmp_path) as url:
        yield url


@contextlib.asynccontextmanager
async def run_prometheus(target: str, tmp_path: Path) -> AsyncIterator[str]:
    """A real Prometheus scraping ``target`` (HOST:PORT, path /metrics) every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "prometheus not found on PATH: install Debian's 'prometheus' package "
            "(apt-get install -y prometheus, as scripts/bootstrap does); this test must not be skipped"
        )
    config = tmp_path / "prometheus.yml"
    write_prometheus_config(config, target)
    address = f"127.0.0.1:{free_port()}"
    process = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address={address}",
        "--log.level=warn",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_target_up(f"http://{address}")
        yield f"http://{address}"
    finally:
        if process.returncode is None:
            process.terminate()  # by pid: only the process this fixture started
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


def args(proxy: ProxyProcess, prometheus: str, steps: str, *extra: str) -> list[str]:
    return [
        "--config", str(proxy.config_path), "--prometheus", prometheus, "--window", "3s",
        "--steps", steps, *FAST, *extra,
    ]  # fmt: skip


async def test_promoted_with_prometheus(proxy: ProxyProcess, prometheus: str) -> None:
    async with traffic(proxy.url), rollout(*args(proxy, prometheus, "20,50,100")) as run:
        assert await run.exit_code(timeout=25) == 0, run.messages
    weight, state = file_state(proxy.config_path)
    assert weight == 100 and state["canary-proxy.io/phase"] == "Promoted"
    passed = [m for m in run.messages if m.startswith("check pass")]
    assert len(passed) >= 3  # at least one per step
    assert not any(m.startswith("check fail") for m in run.messages)


async def test_rolled_back_with_prometheus(
    proxy: ProxyProcess, prometheus: str, backends: tuple[Backend, Backend]
) -> None:
    _, canary = backends
    async with (
        traffic(proxy.url),
        rollout(*args(proxy, prometheus, "20,100", "--step-duration", "1m")) as run,
    ):
        await run.wait_log(lambda m: m.startswith("check pass"))
        canary.fail_status = 500
        assert await run.exit_code() == 1, run.messages
    weight, state = file_state(proxy.config_path)
    assert weight == 0 and state["canary-proxy.io/phase"] == "RolledBack"
    analysis = json.loads(state["canary-proxy.io/last-analysis"])
    assert analysis["result"] == "fail" and analysis["canary"]["errorRate"] > 0.01, run.messages[-6:]


async def test_a_mirror_step_with_prometheus_judges_the_copies(
    proxy: ProxyProcess, prometheus: str, backends: tuple[Backend, Backend]
) -> None:
    _, canary = backends
    canary.fail_status = 500
    async with traffic(proxy.url) as load, rollout(*args(proxy, prometheus, "mirror:1m,20,100")) as run:
        assert await run.exit_code() == 1, run.messages
    weight, state = file_state(proxy.config_path)
    assert weight == 0 and state["canary-proxy.io/phase"] == "RolledBack"
    analysis = json.loads(state["canary-proxy.io/last-analysis"])
    # A verdict (not inconclusive) needs all three mirror queries: requests, errors and p99.
    assert analysis["result"] == "fail" and analysis["canary"]["errorRate"] > 0.99, run.messages[-6:]
    assert (
        analysis["canary"]["p99"] is not None and "canary judged on its mirrored copies" in analysis["notes"]
    )
    assert load.versions.keys() == {"stable"}


# -- two routes on one proxy: PromQL reads one route's series only -------------------------------

# Route names are any string: these two need escaping in PromQL (and in the exposition).
OURS = 'shop/"cart"\\v2'
THEIRS = "shop/checkout"


@pytest.fixture
async def two_routes() -> AsyncIterator[str]:
    """A /metrics page from the proxy's own collectors, growing at each scrape: ``OURS`` healthy
    (canary, stable and mirrored copies: 20 requests of 20 ms each), ``THEIRS`` with a canary
    and copies that fail every request after 5 s, plus requests no route took."""
    metrics = Metrics(registry := CollectorRegistry())
    for route in (OURS, THEIRS):
        metrics.init_data_plane(route)

    def grow() -> None:
        for _ in range(20):
            metrics.count_request(OURS, "stable", 200, "GET", 0.02)
            metrics.count_request(OURS, "canary", 200, "GET", 0.02)
            metrics.count_mirror(OURS, "200", 0.02)
            metrics.count_request(THEIRS, "canary", 503, "GET", 5.0)
            metrics.count_mirror(THEIRS, "timeout", 5.0)
            metrics.count_rejected(404, "GET")

    async with metrics_page(registry, grow) as port:
        yield f"127.0.0.1:{port}"


async def sample_when_counted(source: PrometheusSource, timeout: float = 15) -> Window:
    """Sample until ``increase()`` has two scrapes of the canary to compare (polled: bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        window = await source.sample(10)
        if window.canary.requests > 0 and window.canary.p99 is not None:
            return window
        if time.monotonic() > deadline:
            raise AssertionError(f"no canary requests in prometheus after {timeout}s: {window}")
        await asyncio.sleep(0.2)


async def test_prometheus_reads_one_routes_series(two_routes: str, tmp_path: Path) -> None:
    async with run_prometheus(two_routes, tmp_path) as url, aiohttp.ClientSession() as session:
        ours = await sample_when_counted(PrometheusSource(url, session, mirror=True, route=OURS))
        theirs = await sample_when_counted(PrometheusSource(url, session, mirror=True, route=THEIRS))
    assert ours.mirror is not None and theirs.mirror is not None
    for stats in (ours.canary, ours.stable, ours.mirror):
        assert stats.requests > 0 and stats.errors == 0, ours
        assert stats.p99 is not None and stats.p99 <= 0.025, ours  # none of theirs at 5 s
    # Each query extrapolates at its own instant: every request failed, give or take that.
    assert theirs.canary.errors == pytest.approx(theirs.canary.requests, rel=0.1), theirs
    assert theirs.mirror.errors == pytest.approx(theirs.mirror.requests, rel=0.1), theirs
    assert theirs.stable.requests == 0 and theirs.canary.p99 is not None and theirs.canary.p99 > 2.5
