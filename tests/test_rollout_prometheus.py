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

from .conftest import Backend, ProxyFactory, ProxyProcess, base_config
from .rollouts import FAST, LATENCY, file_state, rollout, traffic


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
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "prometheus not found on PATH: install Debian's 'prometheus' package "
            "(apt-get install -y prometheus, as scripts/bootstrap does); this test must not be skipped"
        )
    config = tmp_path / "prometheus.yml"
    write_prometheus_config(config, proxy.admin_url.removeprefix("http://"))
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
