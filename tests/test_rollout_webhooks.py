"""Rollout webhooks end to end: the real rollout process calling real HTTP receivers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from .conftest import Backend, ProxyFactory, ProxyProcess
from .rollouts import file_state, rollout, rollout_args, rollout_proxy, traffic

PAYLOAD_KEYS = {"name", "namespace", "phase", "step", "weight", "analysis", "kind", "message"}


@dataclass
class Receiver:
    """Records every call per kind; answers with ``status[kind]`` (200 unless set)."""

    url: str = ""
    calls: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)
    called: asyncio.Event = field(default_factory=asyncio.Event)

    def hook(self, kind: str) -> str:
        return f"{kind}={self.url}/{kind}"

    async def wait_for(self, kind: str, count: int = 1, timeout: float = 15) -> list[dict[str, Any]]:
        async def until() -> list[dict[str, Any]]:
            while len(self.calls.get(kind, [])) < count:
                self.called.clear()
                await self.called.wait()
            return self.calls[kind]

        return await asyncio.wait_for(until(), timeout)


RECEIVER = web.AppKey("receiver", Receiver)


async def _record(request: web.Request) -> web.Response:
    receiver = request.app[RECEIVER]
    kind = request.match_info["kind"]
    receiver.calls.setdefault(kind, []).append(await request.json())
    receiver.called.set()
    status = receiver.status.get(kind, 200)
    return web.Response(status=status, text=f"{kind}: {status}")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()
    app = web.Application()
    app[RECEIVER] = state
    app.router.add_post("/{kind}", _record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield state
    await runner.cleanup()


@pytest.fixture
async def proxy(backends: tuple[Backend, Backend], proxy_factory: ProxyFactory) -> ProxyProcess:
    return await rollout_proxy(backends, proxy_factory)


def args(proxy: ProxyProcess, steps: str, *extra: str) -> list[str]:
    return rollout_args(proxy, steps, "--webhook-retries", "0", *extra)


async def test_a_refused_pre_rollout_stops_before_any_weight_is_written(
    proxy: ProxyProcess, receiver: Receiver
) -> None:
    receiver.status["pre-rollout"] = 412
    async with rollout(*args(proxy, "20,100", "--webhook", receiver.hook("pre-rollout"),
                             "--webhook", receiver.hook("event"))) as run:  # fmt: skip
        assert await run.exit_code() == 1
    weight, state = file_state(proxy.config_path)
    assert weight == 0  # no weight written
    assert state["canary-proxy.io/phase"] == "RolledBack"
    assert "pre-rollout webhook said no (HTTP 412" in state["canary-proxy.io/message"]
    (call,) = receiver.calls["pre-rollout"]
    assert set(call) == PAYLOAD_KEYS and call["step"] == 0 and call["weight"] == 20
    assert [e["phase"] for e in receiver.calls["event"]] == ["RolledBack"]


async def test_pre_step_holds_the_step_until_it_answers_2xx(proxy: ProxyProcess, receiver: Receiver) -> None:
    receiver.status["pre-step"] = 409
    async with (
        traffic(proxy.url),
        rollout(*args(proxy, "20,50,100", "--webhook", receiver.hook("pre-step"))) as run,
    ):
        await run.wait_log(
            lambda m: m.startswith("holding at step 1/3 (20%): pre-step webhook said no (HTTP 409")
        )
        assert file_state(proxy.config_path)[0] == 20  # held: still 20 %
        calls_while_holding = len(receiver.calls["pre-step"])
        receiver.status["pre-step"] = 200
        assert await run.exit_code() == 0
    assert file_state(proxy.config_path)[0] == 100
    first = receiver.calls["pre-step"][0]
    assert set(first) == PAYLOAD_KEYS and first["weight"] == 50 and first["analysis"]["result"] == "pass"
    assert len(receiver.calls["pre-step"]) >= calls_while_holding + 2  # then asked before 50 and 100


async def test_confirm_promotion_holds_before_100_percent(proxy: ProxyProcess, receiver: Receiver) -> None:
    receiver.status["confirm-promotion"] = 403
    hooks = ("--webhook", receiver.hook("confirm-promotion"), "--webhook", receiver.hook("event"))
    async with traffic(proxy.url), rollout(*args(proxy, "30,100", *hooks)) as run:
        await receiver.wait_for("confirm-promotion", 2)  # refused twice: still held
        assert file_state(proxy.config_path)[0] == 30  # the weight never went to 100
        receiver.status["confirm-promotion"] = 200
        assert await run.exit_code() == 0
    assert file_state(proxy.config_path)[0] == 100
    assert [e["phase"] for e in receiver.calls["event"]] == ["Progressing", "Promoted"]


async def test_rollback_and_event_webhooks_are_told_of_a_rollback(
    proxy: ProxyProcess, receiver: Receiver, backends: tuple[Backend, Backend]
) -> None:
    _, canary = backends
    canary.fail_status = 500
    hooks = ("--webhook", receiver.hook("rollback"), "--webhook", receiver.hook("event"))
    async with traffic(proxy.url), rollout(*args(proxy, "20,100", *hooks)) as run:
        assert await run.exit_code() == 1
    (call,) = receiver.calls["rollback"]
    assert call["phase"] == "RolledBack" and call["weight"] == 0
    assert call["analysis"]["result"] == "fail"
    assert [e["phase"] for e in receiver.calls["event"]] == ["Progressing", "RolledBack"]


def test_bad_webhook_arguments_exit_2() -> None:
    import subprocess
    import sys

    for bad in ("nope=http://x", "pre-step", "pre-step=ftp://x"):
        result = subprocess.run(
            [sys.executable, "-m", "canary_proxy", "rollout", "--config", "x.yaml", "--steps", "100",
             "--webhook", bad],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert result.returncode == 2, (bad, result.stderr)
