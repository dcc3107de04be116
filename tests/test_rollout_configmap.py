"""Rollouts in ConfigMap mode: the real proxy (``serve --configmap``) and the real ``rollout``
process against the fake API server; state and weights are checked on the ConfigMap itself,
and on the proxy's dashboard data (``/stats``), which reads the state from its annotations."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from canary_proxy.k8s import KubeClient, load_config
from canary_proxy.rollout.state import RolloutState, encode
from canary_proxy.rollout.store import Change, ConfigMapStore, Missing, Stored

from .conftest import Backend, ProxyProcess, base_config, start_proxy, stats_until, stop_proxy
from .fakekube import FakeKube
from .rollouts import FAST, LATENCY, cli, rollout, traffic, weights_loaded
from .scrape import scrape

NAME = "shop"


def annotations(fake: FakeKube) -> dict[str, str]:
    cm = fake.configmap(NAME)
    assert cm is not None
    return dict(cm["metadata"].get("annotations") or {})


def data(fake: FakeKube) -> dict[str, str]:
    cm = fake.configmap(NAME)
    assert cm is not None
    return dict(cm["data"])


async def serve(
    fake: FakeKube, backends: tuple[Backend, Backend], tmp_path: Path, *args: str
) -> ProxyProcess:
    """The proxy following ConfigMap default/shop, whose weight is out of 1000."""
    stable, canary = backends
    config = base_config(stable, canary, canary_weight=0, canary_weight_total=1000)
    fake.put_configmap(NAME, {k: str(v) for k, v in config.items()})
    assert fake.kubeconfig is not None
    return await start_proxy(
        None, tmp_path, "--configmap", NAME, "--kubeconfig", str(fake.kubeconfig),
        "--access-log", "off", *args, use_config=False,
    )  # fmt: skip


@pytest.fixture
async def proxy(
    fake_kube: FakeKube, backends: tuple[Backend, Backend], tmp_path: Path
) -> AsyncIterator[ProxyProcess]:
    stable, canary = backends
    stable.delay = canary.delay = LATENCY
    proxy = await serve(fake_kube, backends, tmp_path)
    yield proxy
    await stop_proxy(proxy)


def phase(stats: dict[str, Any]) -> str | None:
    """The rollout phase the dashboard shows."""
    return (stats["rollout"] or {}).get("phase")


async def status_json(fake: FakeKube) -> dict[str, Any]:
    code, out, err = await cli("status", NAME, "--kubeconfig", str(fake.kubeconfig), "-o", "json")
    assert code == 0, err
    report: dict[str, Any] = json.loads(out)
    return report


async def applied(proxy: ProxyProcess, mark: int, workers: int) -> None:
    """Wait until a config written after ``mark`` is in effect: loaded, and by every worker."""

    def done(_: object) -> bool:
        messages = [str(e.get("msg", "")) for e in proxy.logs[mark:]]
        if workers == 1:
            return any(m.startswith("config loaded") for m in messages)
        return messages.count("worker applied config") >= workers

    await proxy.wait_log(done, since=mark)


def args(fake: FakeKube, proxy: ProxyProcess | None, steps: str, *extra: str) -> list[str]:
    metrics = proxy.admin_url + "/metrics" if proxy else "http://127.0.0.1:9/metrics"
    return [
        NAME, "--kubeconfig", str(fake.kubeconfig), "--metrics-url", metrics, "--steps", steps, *FAST, *extra,
    ]  # fmt: skip


async def test_promoted_through_the_configmap(fake_kube: FakeKube, proxy: ProxyProcess) -> None:
    async with traffic(proxy.url), rollout(*args(fake_kube, proxy, "20,50,100")) as run:
        assert await run.exit_code() == 0, run.messages
    assert data(fake_kube)["canary-weight"] == "1000"  # 100 % of canary-weight-total 1000
    notes = annotations(fake_kube)
    assert (notes["canary-proxy.io/phase"], notes["canary-proxy.io/step"]) == ("Promoted", "2")
    assert notes["canary-proxy.io/steps"] == "20,50,100"
    assert json.loads(notes["canary-proxy.io/last-analysis"])["result"] == "pass"
    await proxy.wait_log(lambda e: e.get("effective", {}).get("canary-weight") == 1000)
    assert weights_loaded(proxy.logs) == [0, 200, 500, 1000]
    code, out, _ = await cli("status", NAME, "--kubeconfig", str(fake_kube.kubeconfig))
    assert code == 0 and out.startswith(f"configmap default/{NAME}: Promoted")
    assert "weight:    1000 of 1000 (100%)" in out
    stats = await stats_until(proxy, lambda s: phase(s) == "Promoted")
    assert stats["rollout"] == await status_json(fake_kube)  # the dashboard shows what status says


async def test_rolled_back_through_the_configmap(
    fake_kube: FakeKube, proxy: ProxyProcess, backends: tuple[Backend, Backend]
) -> None:
    _, canary = backends
    async with traffic(proxy.url), rollout(*args(fake_kube, proxy, "20,100", "--step-duration", "1m")) as run:
        await run.wait_log(lambda m: m.startswith("check pass"))
        canary.fail_status = 503
        assert await run.exit_code() == 1
    assert data(fake_kube)["canary-weight"] == "0"
    notes = annotations(fake_kube)
    assert notes["canary-proxy.io/phase"] == "RolledBack"
    analysis = json.loads(notes["canary-proxy.io/last-analysis"])
    assert analysis["result"] == "fail" and analysis["canary"]["errors"] > 0
    await proxy.wait_log(lambda e: e.get("effective", {}).get("canary-weight") == 0, since=1)


async def test_abort_and_an_api_outage(fake_kube: FakeKube, proxy: ProxyProcess) -> None:
    async with traffic(proxy.url), rollout(*args(fake_kube, proxy, "20,100", "--step-duration", "1m")) as run:
        await run.wait_log(lambda m: m.startswith("check pass"))
        await fake_kube.stop()  # shorter than --progress-deadline: the rollout waits it out
        await run.wait_log(lambda m: "retrying next interval" in m)
        await fake_kube.start()
        mark = len(run.logs)
        await run.wait_log(lambda m: m.startswith("check pass") and len(run.logs) > mark)
        code, _, err = await cli("abort", NAME, "--kubeconfig", str(fake_kube.kubeconfig))
        assert code == 0, err
        assert await run.exit_code() == 1
    assert data(fake_kube)["canary-weight"] == "0"
    notes = annotations(fake_kube)
    assert notes["canary-proxy.io/phase"] == "Aborted" and "canary-proxy.io/command" not in notes


async def test_a_missing_configmap_or_api_exits_3(fake_kube: FakeKube, tmp_path: Path) -> None:
    code, _, err = await cli("rollout", *args(fake_kube, None, "100"))
    assert code == 3 and f"configmap default/{NAME} not found" in err
    fake_kube.put_configmap(NAME, {"stable-url": "http://127.0.0.1:1", "canary-url": "http://127.0.0.1:2"})
    await fake_kube.stop()
    code, _, err = await cli("rollout", *args(fake_kube, None, "100"))
    assert code == 3, err
    code, _, err = await cli("rollout", "Not_A_Name", "--steps", "100", "--metrics-url", "http://x")
    assert code == 2


@pytest.fixture
async def store(fake_kube: FakeKube) -> AsyncIterator[ConfigMapStore]:
    assert fake_kube.kubeconfig is not None
    async with KubeClient(await load_config(fake_kube.kubeconfig)) as client:
        yield ConfigMapStore(client, "default", NAME)


async def test_store_writes_are_conflict_safe(fake_kube: FakeKube, store: ConfigMapStore) -> None:
    fake_kube.put_configmap(NAME, {"canary-weight-total": "1000"})
    calls: list[dict[str, Any]] = []

    def mutate(current: Stored) -> Change:
        calls.append(dict(current.annotations))
        if len(calls) == 1:  # another writer gets in between our read and our write
            fake_kube.patch_configmap(NAME, {"canary-by-header": "X-QA"})
        return Change(12.5, {"canary-proxy.io/phase": "Progressing"})

    await store.update(mutate)
    assert len(calls) == 2  # 409 Conflict: read again, decide again
    assert data(fake_kube) == {
        "canary-weight-total": "1000",
        "canary-by-header": "X-QA",  # the other writer's change is kept
        "canary-weight": "125",  # 12.5 % of 1000
    }
    assert annotations(fake_kube) == {"canary-proxy.io/phase": "Progressing"}
    fake_kube.delete_configmap(NAME)
    with pytest.raises(Missing):
        await store.load()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_the_dashboard_follows_the_rollout_in_the_annotations_without_reloading(
    fake_kube: FakeKube,
    backends: tuple[Backend, Backend],
    tmp_path: Path,
    store: ConfigMapStore,
    workers: str,
) -> None:
    proxy = await serve(fake_kube, backends, tmp_path, "--workers", workers)
    try:
        assert (await proxy.admin_json("/stats"))["rollout"] is None
        now = time.time()
        state = RolloutState(
            phase="Progressing",
            steps="20,pause,100",
            step=0,
            message="at step 1/3",
            step_started=now,
            progress_since=now,
        )
        mark = len(proxy.logs)
        await store.update(lambda _: Change(20, encode(state)))  # weight and state in one write
        await applied(proxy, mark, int(workers))
        stats = await stats_until(proxy, lambda s: phase(s) == "Progressing")
        assert stats["rollout"]["stepDescription"] == "1/3 (20%)"
        assert (stats["rollout"]["weight"], stats["rollout"]["percent"]) == ("200", 20)
        assert stats["weight"] == {"weight": 200, "total": 1000, "percent": 20.0}
        reloads = (await scrape(proxy)).value("canary_proxy_config_reloads_total", result="success")

        mark = len(proxy.logs)
        paused = state.with_(phase="Paused", step=1, message="paused until promote")
        await store.update(lambda _: Change(annotations=encode(paused)))  # the annotations alone
        stats = await stats_until(proxy, lambda s: phase(s) == "Paused")
        assert stats["rollout"]["message"] == "paused until promote"
        assert stats["rollout"] == await status_json(fake_kube)
        # The proxy has taken in the event (the dashboard shows it), but reloaded nothing.
        assert (await scrape(proxy)).value("canary_proxy_config_reloads_total", result="success") == reloads
        reloaded = [e["msg"] for e in proxy.logs[mark:] if "config" in str(e.get("msg", ""))]
        assert reloaded == []  # neither "config loaded" nor (workers) "worker applied config"
    finally:
        await stop_proxy(proxy)
