"""Live reload of the config file: every way a file changes, bad configs kept out, no drops."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import yaml

from .conftest import Backend, ProxyFactory, base_config


async def served_by(client: aiohttp.ClientSession, url: str) -> str:
    async with client.get(url + "/") as r:
        await r.read()
        return r.headers["X-Canary-Version"]


async def test_reload_when_written_in_place(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    mark = len(proxy.logs)
    started = time.monotonic()
    with open(proxy.config_path, "w") as f:  # noqa: ASYNC230 - truncate + write, same inode
        f.write(yaml.safe_dump(base_config(stable, canary, canary_weight=100)))
    await proxy.wait_log(lambda e: str(e.get("msg")).startswith("config loaded"), since=mark)
    assert time.monotonic() - started < 1.0
    assert await served_by(client, proxy.url) == "canary"


async def test_reload_through_a_kubernetes_style_symlink_swap(
    backends: tuple[Backend, Backend],
    proxy_factory: ProxyFactory,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Kubelet mounts a ConfigMap as ``key -> ..data/key`` and ``..data -> ..<timestamp>``,
    and updates it by re-pointing ``..data`` atomically with a rename."""
    stable, canary = backends
    mount = tmp_path / "mount"
    mount.mkdir()

    def publish(version: str, config: dict[str, object]) -> None:
        target = mount / f"..{version}"
        target.mkdir()
        (target / "canary.yaml").write_text(yaml.safe_dump(config))
        (mount / "..data_tmp").symlink_to(target.name)
        os.replace(mount / "..data_tmp", mount / "..data")

    publish("2026_01", base_config(stable, canary))
    (mount / "canary.yaml").symlink_to("..data/canary.yaml")
    proxy = await proxy_factory(None, config_path=mount / "canary.yaml")
    assert await served_by(client, proxy.url) == "stable"
    mark = len(proxy.logs)
    publish("2026_02", base_config(stable, canary, canary_weight=100))
    await proxy.wait_log(lambda e: str(e.get("msg")).startswith("config loaded"), since=mark, timeout=1.0)
    assert await served_by(client, proxy.url) == "canary"


async def test_a_bad_config_is_rejected_with_its_reason_and_the_last_good_one_keeps_serving(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    good = base_config(stable, canary, canary_weight=100)
    proxy = await proxy_factory(good)
    entry = await proxy.reload({**good, "canary-weight": 150}, expect_ok=False)
    assert "canary-weight" in entry["msg"] and "150" in entry["msg"]
    assert await served_by(client, proxy.url) == "canary"
    proxy.config_path.write_text("stable-url: [unclosed\n")
    await proxy.wait_log(lambda e: "invalid YAML" in str(e.get("msg")))
    assert await served_by(client, proxy.url) == "canary"
    assert (await proxy.admin_json("/config"))["canary-weight"] == 100
    await proxy.reload(base_config(stable, canary, canary_weight=0))
    assert await served_by(client, proxy.url) == "stable"


async def test_reload_under_concurrent_load_fails_no_request(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary), "--access-log", "off")
    results: list[int] = []
    seen: set[str] = set()
    done = asyncio.Event()

    async def load(session: aiohttp.ClientSession) -> None:
        while not done.is_set():
            async with session.post(proxy.url + "/", data=b"x" * 2048) as r:
                await r.read()
                results.append(r.status)
                seen.add(r.headers["X-Canary-Version"])

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        tasks = [asyncio.create_task(load(session)) for _ in range(16)]
        for weight in (10, 50, 90, 0, 100, 30, 70, 100, 0, 50):
            await proxy.reload(base_config(stable, canary, canary_weight=weight))
        done.set()
        await asyncio.gather(*tasks)
    assert len(results) > 200
    assert set(results) == {200}
    assert seen == {"stable", "canary"}
