"""ConfigMap mode end to end: the real proxy process and the real CLI against the fake API."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp

from .conftest import Backend, ProxyProcess, base_config, start_proxy, stop_proxy
from .fakekube import FakeKube

NAME = "canary-proxy"


def as_data(config: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in config.items()}


async def serve_configmap(
    fake: FakeKube, tmp_path: Path, *args: str, wait_ready: bool = True
) -> ProxyProcess:
    assert fake.kubeconfig is not None
    proxy = await start_proxy(
        None,
        tmp_path,
        "--configmap",
        f"default/{NAME}",
        "--kubeconfig",
        str(fake.kubeconfig),
        *args,
        use_config=False,
        wait_ready=wait_ready,
    )
    return proxy


async def cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "canary_proxy", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ),
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def loaded(proxy: ProxyProcess, mark: int, **expect: Any) -> dict[str, Any]:
    """Wait for the proxy's log line that loads a config with these effective values."""
    return await proxy.wait_log(
        lambda e: (
            str(e.get("msg", "")).startswith("config loaded")
            and all(e["effective"].get(k.replace("_", "-")) == v for k, v in expect.items())
        ),
        since=mark,
    )


async def versions(client: aiohttp.ClientSession, url: str, n: int) -> set[str]:
    seen = set()
    for _ in range(n):
        async with client.get(url + "/") as r:
            assert r.status == 200
            seen.add(r.headers["X-Canary-Version"])
            await r.read()
    return seen


async def test_weight_changes_reach_the_proxy_under_load_with_no_failed_request(
    fake_kube: FakeKube, backends: tuple[Backend, Backend], tmp_path: Path
) -> None:
    stable, canary = backends
    fake_kube.put_configmap(NAME, as_data(base_config(stable, canary)))
    proxy = await serve_configmap(fake_kube, tmp_path, "--access-log", "off")
    statuses: list[int] = []
    done = asyncio.Event()

    async def load(session: aiohttp.ClientSession) -> None:
        while not done.is_set():
            async with session.get(proxy.url + "/") as r:
                await r.read()
                statuses.append(r.status)

    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            tasks = [asyncio.create_task(load(session)) for _ in range(8)]
            for weight in ("10", "50", "100", "0", "25"):
                mark = len(proxy.logs)
                code, out, err = await cli("weight", NAME, weight, "--kubeconfig", str(fake_kube.kubeconfig))
                assert code == 0, err
                assert f"canary-weight {weight} of 100" in out
                await loaded(proxy, mark, canary_weight=int(weight))
            done.set()
            await asyncio.gather(*tasks)
        assert len(statuses) > 100 and set(statuses) == {200}
        assert (await proxy.admin_json("/config"))["canary-weight"] == 25
    finally:
        await stop_proxy(proxy)


async def test_invalid_update_is_kept_out_and_deleted_configmap_keeps_serving(
    fake_kube: FakeKube, backends: tuple[Backend, Backend], tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    good = as_data(base_config(stable, canary, canary_weight=100))
    fake_kube.put_configmap(NAME, good)
    proxy = await serve_configmap(fake_kube, tmp_path)
    try:
        mark = len(proxy.logs)
        fake_kube.put_configmap(NAME, {**good, "canary-weight": "lots"})
        entry = await proxy.wait_log(lambda e: str(e.get("msg", "")).startswith("rejected"), since=mark)
        assert "canary-weight" in entry["msg"] and "'lots'" in entry["msg"]
        assert await versions(client, proxy.url, 5) == {"canary"}
        metrics = await proxy.metrics_text()
        assert 'canary_proxy_config_reloads_total{result="failure"} 1.0' in metrics
        mark = len(proxy.logs)
        fake_kube.delete_configmap(NAME)
        entry = await proxy.wait_log(lambda e: "does not exist" in str(e.get("msg", "")), since=mark)
        assert entry["level"] == "error"
        assert await versions(client, proxy.url, 5) == {"canary"}
        async with client.get(proxy.admin_url + "/readyz") as r:
            assert r.status == 200
        mark = len(proxy.logs)
        fake_kube.put_configmap(NAME, {**good, "canary-weight": "0"})
        await loaded(proxy, mark, canary_weight=0)
        assert await versions(client, proxy.url, 5) == {"stable"}
    finally:
        await stop_proxy(proxy)


async def test_compaction_cut_watches_and_api_errors_are_survived(
    fake_kube: FakeKube, backends: tuple[Backend, Backend], tmp_path: Path
) -> None:
    stable, canary = backends
    data = as_data(base_config(stable, canary))
    fake_kube.put_configmap(NAME, data)
    proxy = await serve_configmap(fake_kube, tmp_path)
    try:
        for step, disrupt in enumerate(("compact", "cut", "500", "429")):
            mark = len(proxy.logs)
            if disrupt == "compact":
                fake_kube.compact()
                fake_kube.cut_watches()  # the next watch resumes from a compacted version: 410
            elif disrupt == "cut":
                fake_kube.cut_watches()
            else:
                fake_kube.fail_next(2, status=int(disrupt), retry_after=1 if disrupt == "429" else None)
                fake_kube.cut_watches()
            fake_kube.put_configmap(NAME, {**data, "canary-weight": str(step + 1)})
            await loaded(proxy, mark, canary_weight=step + 1)
    finally:
        await stop_proxy(proxy)


async def test_a_proxy_started_while_the_api_is_down_becomes_ready_when_it_comes_up(
    fake_kube: FakeKube, backends: tuple[Backend, Backend], tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    stable, canary = backends
    fake_kube.put_configmap(NAME, as_data(base_config(stable, canary)))
    await fake_kube.stop()
    proxy = await serve_configmap(fake_kube, tmp_path, wait_ready=False)
    try:
        admin = await proxy.wait_log(lambda e: "admin" in e)
        async with client.get("http://" + admin["admin"] + "/readyz") as r:
            assert r.status == 503
        await proxy.wait_log(lambda e: "API unavailable" in str(e.get("msg", "")))
        await fake_kube.start()
        ready = await proxy.wait_log(lambda e: e.get("msg") == "ready", timeout=20)
        async with client.get("http://" + ready["admin"] + "/readyz") as r:
            assert r.status == 200
        assert await versions(client, "http://" + ready["public"], 3) == {"stable"}
    finally:
        await stop_proxy(proxy)


async def test_two_concurrent_weight_writers_are_both_applied_in_order(
    fake_kube: FakeKube, backends: tuple[Backend, Backend]
) -> None:
    stable, canary = backends
    fake_kube.put_configmap(NAME, as_data(base_config(stable, canary)))
    start_rv = int(fake_kube.resource_version)
    kubeconfig = str(fake_kube.kubeconfig)
    results = await asyncio.gather(
        *(cli("weight", f"default/{NAME}", value, "--kubeconfig", kubeconfig) for value in ("30", "60"))
    )
    assert [code for code, _, _ in results] == [0, 0]
    # Each writer wrote exactly once, each with the resourceVersion it had read: two commits.
    assert int(fake_kube.resource_version) == start_rv + 2
    final = fake_kube.configmap(NAME)
    assert final is not None
    rvs = {value: int(out.rsplit("resourceVersion ", 1)[1].rstrip(")\n")) for (_, out, _), value in
           zip(results, ("30", "60"), strict=True)}  # fmt: skip
    last = max(rvs, key=lambda v: rvs[v])
    assert final["data"]["canary-weight"] == last  # the later commit is what stands


async def test_weight_validates_before_writing_and_reports_missing_or_unreachable(
    fake_kube: FakeKube, backends: tuple[Backend, Backend]
) -> None:
    stable, canary = backends
    fake_kube.put_configmap(NAME, as_data(base_config(stable, canary, canary_weight_total=1000)))
    rv = fake_kube.resource_version
    kubeconfig = str(fake_kube.kubeconfig)
    code, _, err = await cli("weight", NAME, "150", "--kubeconfig", kubeconfig)
    assert code == 0, err  # 150 of 1000 is fine
    rv = fake_kube.resource_version
    code, _, err = await cli("weight", NAME, "1500", "--kubeconfig", kubeconfig)
    assert code == 2 and "from 0 to 1000" in err
    code, _, err = await cli("weight", NAME, "ten", "--kubeconfig", kubeconfig)
    assert code == 2 and "canary-weight" in err
    assert fake_kube.resource_version == rv  # untouched
    code, _, err = await cli("weight", "default/missing", "5", "--kubeconfig", kubeconfig)
    assert code == 3 and "not found" in err
    await fake_kube.stop()
    code, _, err = await cli("weight", NAME, "5", "--kubeconfig", kubeconfig)
    assert code == 3


async def test_get_prints_config_rollout_status_and_each_replica(
    fake_kube: FakeKube, backends: tuple[Backend, Backend], tmp_path: Path
) -> None:
    stable, canary = backends
    fake_kube.put_configmap(
        NAME,
        as_data(base_config(stable, canary, canary_weight=5)),
        annotations={"canary-proxy.io/phase": "Progressing", "canary-proxy.io/step": "0", "other": "x"},
    )
    proxy = await serve_configmap(fake_kube, tmp_path)
    try:
        admin_port = int(proxy.admin_url.rsplit(":", 1)[1])
        fake_kube.put_endpoints(
            "canary-proxy-admin",
            [{"addresses": [{"ip": "127.0.0.1"}], "ports": [{"name": "admin", "port": admin_port}]}],
        )
        import yaml

        code, out, err = await cli(
            "get", NAME, "--service", "canary-proxy-admin", "--admin-port", "admin",
            "--kubeconfig", str(fake_kube.kubeconfig),
        )  # fmt: skip
        assert code == 0, err
        report = yaml.safe_load(out)
        assert report["config"]["canary-weight"] == 5
        assert report["rollout"] == {"phase": "Progressing", "step": "0"}
        assert report["replicas"] == [
            {"address": f"127.0.0.1:{admin_port}", "canary-weight": 5, "in-sync": True}
        ]
    finally:
        await stop_proxy(proxy)
