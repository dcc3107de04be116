"""``mirror:D`` rollout steps end to end: the real proxy mirroring to real backends, the real
``rollout`` process judging the canary on the copies before any user is routed to it."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from .conftest import Backend, ProxyFactory, ProxyProcess
from .rollouts import cli, file_state, rollout, rollout_args, rollout_proxy, traffic, weights_loaded


@pytest.fixture
async def proxy(backends: tuple[Backend, Backend], proxy_factory: ProxyFactory) -> ProxyProcess:
    return await rollout_proxy(backends, proxy_factory)


def mirrors_loaded(proxy_logs: list[dict[str, Any]]) -> list[Any]:
    return weights_loaded(proxy_logs, "canary-mirror-percent")


def mirrored_copies(backend: Backend) -> int:
    return sum(1 for r in backend.requests if any(k.lower() == "x-canary-mirror" for k, _ in r["headers"]))


async def test_a_mirror_step_judges_the_copies_then_moves_users(
    proxy: ProxyProcess, backends: tuple[Backend, Backend]
) -> None:
    _, canary = backends
    steps = "mirror:2s,50,100"
    async with (
        traffic(proxy.url) as load,
        rollout(*rollout_args(proxy, steps, "--mirror-percent", "50")) as run,
    ):
        await run.wait_log(lambda m: m.startswith("rollout started"))
        first = await run.wait_log(lambda m: m.startswith("check pass at step 1/3 (mirror:2s"))
        assert "canary judged on its mirrored copies" in first["msg"]
        users_on_canary = load.versions["canary"]
        assert users_on_canary == 0 and mirrored_copies(canary) > 0  # copies only, no users
        config = yaml.safe_load(proxy.config_path.read_text())
        assert (config["canary-weight"], config["canary-mirror-percent"]) == (0, 50)
        assert await run.exit_code() == 0
    weight, state = file_state(proxy.config_path)
    assert weight == 100 and state["canary-proxy.io/phase"] == "Promoted"
    assert yaml.safe_load(proxy.config_path.read_text())["canary-mirror-percent"] == 0
    assert [m for m in run.messages if m.startswith(("rollout started", "step done", "promoted"))] == [
        "rollout started: steps mirror:2s,50,100; "
        "step 1/3 (mirror:2s, mirroring to the canary, no users on it)",
        "step done; now at step 2/3 (50%)",
        "step done; now at step 3/3 (100%)",
        "promoted: step done at step 3/3 (100%); the canary serves 100%",
    ]
    await proxy.wait_log(lambda e: e.get("effective", {}).get("canary-weight") == 100)
    assert weights_loaded(proxy.logs) == [0, 50, 100]
    assert mirrors_loaded(proxy.logs) == [0, 50, 0]  # mirroring stopped when users moved
    assert load.statuses.keys() == {200} and load.versions["canary"] > 0


async def test_a_canary_failing_its_copies_is_rolled_back_before_any_user_reaches_it(
    proxy: ProxyProcess, backends: tuple[Backend, Backend]
) -> None:
    _, canary = backends
    canary.fail_status = 500
    async with traffic(proxy.url) as load, rollout(*rollout_args(proxy, "mirror:1m,10,100")) as run:
        assert await run.exit_code() == 1
    weight, state = file_state(proxy.config_path)
    assert weight == 0 and state["canary-proxy.io/phase"] == "RolledBack"
    assert "2 consecutive failed checks" in state["canary-proxy.io/message"]
    analysis = json.loads(state["canary-proxy.io/last-analysis"])
    assert analysis["result"] == "fail" and analysis["canary"]["errorRate"] == 1.0
    assert "canary judged on its mirrored copies" in analysis["notes"]
    assert weights_loaded(proxy.logs) == [0]  # no user was ever routed to the canary
    assert load.versions.keys() == {"stable"} and load.statuses.keys() == {200}
    assert canary.hits > 0  # it failed on copies alone
    await proxy.wait_log(lambda e: e.get("effective", {}).get("canary-mirror-percent") == 0, since=1)
    assert yaml.safe_load(proxy.config_path.read_text())["canary-mirror-percent"] == 0
    code, out, _ = await cli("status", "--config", str(proxy.config_path))
    assert code == 0 and "RolledBack" in out
